//! Blocks at rest: what the tiers that keep blocks outside memory share to
//! store them compressed (lz4, zstd) and encrypted (AES-256-GCM) — the key
//! file, key derivation, sealing and opening, compression and bounded
//! decompression. Each tier frames the results in its own format and binds
//! its own associated data: G3 in [`crate::disk::codec`], G4 in
//! [`crate::remote::codec`].
//!
//! - The key file holds 32 raw bytes, or 64 hex digits and an optional
//!   newline. One file may serve several tiers: each derives its own block
//!   key and 8-byte key id from it with HKDF-SHA256 under its own salt, so
//!   what one tier sealed never opens in another, and a reader tells a block
//!   sealed under another key (its key id differs: not for it, not damage)
//!   from one that fails authentication under its own (damaged or forged).
//! - Every sealing takes a fresh random 96-bit nonce. Random nonces stay
//!   safe for 2^32 sealings per derived key: rotate keys well before 2^31
//!   blocks.
//! - Compression is kept only where it makes a block smaller; decompression
//!   writes into a buffer of exactly the expected length and refuses
//!   anything that does not fill it exactly, so nothing allocates more than
//!   the reader expected.
//!
//! Keys never leave this module's types: not in `Debug`, not in logs.

use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

use crate::config::Compression;
use crate::error::{Error, Result};

/// Bytes of the key file's key.
pub const KEY_LEN: usize = 32;
/// Bytes of the key id stored with each sealed block.
pub const KEY_ID_LEN: usize = 8;
/// Bytes of a nonce.
pub const NONCE_LEN: usize = ring::aead::NONCE_LEN;
/// Bytes of the authentication tag.
pub const TAG_LEN: usize = 16;
/// Bytes [`Sealer::seal`] adds: key id, nonce and tag.
pub const SEALED_OVERHEAD: usize = KEY_ID_LEN + NONCE_LEN + TAG_LEN;

/// Why stored bytes did not decode. Every one is a miss; they differ in
/// what the reader should think of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The raw length is not the one expected: another layout under the
    /// same namespace name. Not ours to use, not damage.
    Layout,
    /// Not for this reader: sealed under another key, sealed while the
    /// reader has no key, or in the clear while the reader requires a key.
    /// Not damage, but never readable here.
    Foreign,
    /// Damaged or forged: fails authentication under the reader's key, or
    /// does not decompress to exactly its raw length.
    Damaged,
}

/// One tier's block key and its id, derived from a key file's key.
pub struct Sealer {
    key: LessSafeKey,
    id: [u8; KEY_ID_LEN],
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    // The key stays out of logs; its id is no secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("key_id", &self.id_hex())
            .finish_non_exhaustive()
    }
}

/// A key-id-sized HKDF output.
struct IdLen;

impl hkdf::KeyType for IdLen {
    fn len(&self) -> usize {
        KEY_ID_LEN
    }
}

impl Sealer {
    /// The sealer of the tier whose HKDF salt is `salt`, under `key` (a key
    /// file's 32 bytes).
    pub fn new(key: &[u8; KEY_LEN], salt: &[u8]) -> Sealer {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(key);
        let okm = prk
            .expand(&[b"aes-256-gcm block key"], &AES_256_GCM)
            .expect("32 bytes are a valid HKDF-SHA256 output");
        let key = LessSafeKey::new(UnboundKey::from(okm));
        let mut id = [0u8; KEY_ID_LEN];
        prk.expand(&[b"key id"], IdLen)
            .and_then(|okm| okm.fill(&mut id))
            .expect("8 bytes are a valid HKDF-SHA256 output");
        Sealer {
            key,
            id,
            rng: SystemRandom::new(),
        }
    }

    /// The key id stored with what this sealer seals.
    pub fn id(&self) -> &[u8; KEY_ID_LEN] {
        &self.id
    }

    /// The key id in hex, for logs.
    pub fn id_hex(&self) -> String {
        self.id.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Encrypts `buf` in place under a fresh random nonce: the nonce and the
    /// tag, which the caller stores with the key id. `None` when no random
    /// nonce could be had (then nothing may be stored).
    pub fn seal_in_place(
        &self,
        aad: &[u8],
        buf: &mut [u8],
    ) -> Option<([u8; NONCE_LEN], [u8; TAG_LEN])> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let tag = self
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), buf)
            .ok()?;
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(tag.as_ref());
        Some((nonce, t))
    }

    /// Decrypts in place what [`Sealer::seal_in_place`] sealed under `aad`.
    /// [`Refused::Foreign`] when `id` is not this sealer's key id,
    /// [`Refused::Damaged`] when authentication fails (then `buf` holds
    /// garbage).
    pub fn open_in_place(
        &self,
        id: &[u8],
        nonce: &[u8; NONCE_LEN],
        tag: &[u8; TAG_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> std::result::Result<(), Refused> {
        if id != self.id {
            return Err(Refused::Foreign);
        }
        self.key
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(aad),
                Tag::from(*tag),
                buf,
                0..,
            )
            .map(|_| ())
            .map_err(|_| Refused::Damaged)
    }

    /// Seals `body` into one buffer: key id, nonce, ciphertext, tag.
    pub fn seal(&self, aad: &[u8], body: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(SEALED_OVERHEAD + body.len());
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&[0u8; NONCE_LEN]);
        out.extend_from_slice(body);
        let (nonce, tag) = self.seal_in_place(aad, &mut out[KEY_ID_LEN + NONCE_LEN..])?;
        out[KEY_ID_LEN..KEY_ID_LEN + NONCE_LEN].copy_from_slice(&nonce);
        out.extend_from_slice(&tag);
        Some(out)
    }

    /// The plaintext of what [`Sealer::seal`] sealed under `aad` (hostile
    /// bytes: any length is refused, never a panic).
    pub fn open(&self, aad: &[u8], stored: &[u8]) -> std::result::Result<Vec<u8>, Refused> {
        if stored.len() < SEALED_OVERHEAD {
            return Err(Refused::Damaged);
        }
        let (id, rest) = stored.split_at(KEY_ID_LEN);
        let (nonce, rest) = rest.split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| Refused::Damaged)?;
        let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| Refused::Damaged)?;
        let mut buf = ct.to_vec();
        self.open_in_place(id, &nonce, &tag, aad, &mut buf)?;
        Ok(buf)
    }
}

/// What one tier does to blocks at rest: its compression and, with a key,
/// its sealer. Each tier's codec holds one and frames what it produces.
pub struct Scheme {
    pub compression: Compression,
    pub zstd_level: i32,
    pub sealer: Option<Sealer>,
}

impl std::fmt::Debug for Scheme {
    // The key stays out of logs; its id is no secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheme")
            .field("compression", &self.compression)
            .field("zstd_level", &self.zstd_level)
            .field("key_id", &self.key_id())
            .finish()
    }
}

impl Scheme {
    /// The scheme of the tier whose HKDF salt is `salt`, with `key` (a key
    /// file's 32 bytes) or none.
    pub fn new(
        compression: Compression,
        zstd_level: i32,
        key: Option<&[u8; KEY_LEN]>,
        salt: &[u8],
    ) -> Scheme {
        Scheme {
            compression,
            zstd_level,
            sealer: key.map(|k| Sealer::new(k, salt)),
        }
    }

    /// Whether it leaves every block as it is (no compression, no key).
    pub fn is_noop(&self) -> bool {
        self.compression == Compression::None && self.sealer.is_none()
    }

    /// The key's id (hex), for logs.
    pub fn key_id(&self) -> Option<String> {
        self.sealer.as_ref().map(Sealer::id_hex)
    }

    /// A compressor for one thread that encodes.
    pub fn compressor(&self) -> Compressor {
        Compressor::new(self.compression, self.zstd_level)
    }
}

/// Compresses blocks one after another, keeping its compression state
/// between them. One per thread that encodes.
pub struct Compressor {
    compression: Compression,
    zstd_level: i32,
    lz4: Option<lz4_flex::block::CompressTable>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl Compressor {
    pub fn new(compression: Compression, zstd_level: i32) -> Compressor {
        Compressor {
            compression,
            zstd_level,
            lz4: None,
            zstd: None,
        }
    }

    /// Bytes of output room [`Compressor::compress`] needs for `raw_len`
    /// bytes: lz4 wants room for its worst case before it starts.
    pub fn room(&self, raw_len: usize) -> usize {
        match self.compression {
            Compression::Lz4 => lz4_flex::block::get_maximum_output_size(raw_len),
            Compression::None | Compression::Zstd => raw_len,
        }
    }

    /// Compresses `raw` into `out` (at least [`Compressor::room`] long): the
    /// compressed length, or `None` when compression is off or would not
    /// make the block smaller.
    pub fn compress(&mut self, raw: &[u8], out: &mut [u8]) -> Option<usize> {
        if raw.is_empty() {
            return None;
        }
        let n = match self.compression {
            Compression::None => return None,
            Compression::Lz4 => {
                let table = self
                    .lz4
                    .get_or_insert_with(lz4_flex::block::CompressTable::large);
                lz4_flex::block::compress_into_with_table(raw, out, table).ok()?
            }
            Compression::Zstd => {
                if self.zstd.is_none() {
                    self.zstd = zstd::bulk::Compressor::new(self.zstd_level).ok();
                }
                // Room for one byte less than `raw`: what does not fit is
                // not worth keeping.
                let room = (raw.len() - 1).min(out.len());
                self.zstd
                    .as_mut()?
                    .compress_to_buffer(raw, &mut out[..room])
                    .ok()?
            }
        };
        (n < raw.len()).then_some(n)
    }
}

/// Decompresses `stored` into exactly `out.len()` bytes;
/// [`Refused::Damaged`] when it does not decode to exactly that.
pub fn decompress(
    compression: Compression,
    stored: &[u8],
    out: &mut [u8],
) -> std::result::Result<(), Refused> {
    let n = match compression {
        Compression::None => return Err(Refused::Damaged),
        Compression::Lz4 => lz4_flex::block::decompress_into(stored, out).ok(),
        Compression::Zstd => zstd::bulk::decompress_to_buffer(stored, out).ok(),
    };
    match n {
        Some(n) if n == out.len() => Ok(()),
        _ => Err(Refused::Damaged),
    }
}

/// Reads a key file: exactly 32 bytes, or 64 hex digits and an optional
/// newline. `option` names the setting in errors; errors name the file,
/// never its content.
pub fn read_key_file(path: &Path, option: &str) -> Result<[u8; KEY_LEN]> {
    let bad = |why: &str| {
        Error::invalid(format!(
            "{option} {}: {why}; expected 32 raw bytes, or 64 hex digits and \
             an optional newline (e.g. `openssl rand -hex 32`)",
            path.display()
        ))
    };
    let bytes = std::fs::read(path)
        .map_err(|e| Error::io(format!("cannot read {option} {}", path.display()), e))?;
    let key = parse_key(&bytes).ok_or_else(|| {
        let hex_len = bytes.strip_suffix(b"\n").unwrap_or(&bytes).len() == 2 * KEY_LEN;
        bad(&if hex_len {
            "64 characters, not all hex digits".to_string()
        } else {
            format!("{} bytes", bytes.len())
        })
    })?;
    if key == [0u8; KEY_LEN] {
        return Err(bad("an all-zero key"));
    }
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    "{option} is readable by others than its owner"
                );
            }
        }
    }
    Ok(key)
}

/// A key file's content: exactly 32 raw bytes, or 64 hex digits and at
/// most one `\n`.
fn parse_key(bytes: &[u8]) -> Option<[u8; KEY_LEN]> {
    if bytes.len() == KEY_LEN {
        return bytes.try_into().ok();
    }
    let hex = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if hex.len() != 2 * KEY_LEN {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut key = [0u8; KEY_LEN];
    for (k, pair) in key.iter_mut().zip(hex.chunks_exact(2)) {
        *k = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: [u8; KEY_LEN] = [0x11; KEY_LEN];

    #[test]
    fn salts_separate_tiers_and_sealing_round_trips() {
        let g3 = Sealer::new(&KEY_A, b"salt-one");
        let g4 = Sealer::new(&KEY_A, b"salt-two");
        assert_ne!(g3.id(), g4.id(), "one key file, two tiers, two key ids");
        let sealed = g3.seal(b"aad", b"secret prompt").unwrap();
        assert_eq!(sealed.len(), SEALED_OVERHEAD + 13);
        assert_eq!(g3.open(b"aad", &sealed).unwrap(), b"secret prompt");
        assert_eq!(g4.open(b"aad", &sealed), Err(Refused::Foreign));
        assert_eq!(g3.open(b"aax", &sealed), Err(Refused::Damaged));
        assert_eq!(g3.open(b"aad", &sealed[..5]), Err(Refused::Damaged));
        // In place, the tier's own framing: the same key under its salt.
        let mut buf = *b"0123456789";
        let (nonce, tag) = g3.seal_in_place(b"x", &mut buf).unwrap();
        assert_ne!(&buf, b"0123456789");
        let mut bad = buf;
        bad[3] ^= 1;
        assert_eq!(
            g3.open_in_place(g3.id(), &nonce, &tag, b"x", &mut bad),
            Err(Refused::Damaged)
        );
        g3.open_in_place(g3.id(), &nonce, &tag, b"x", &mut buf)
            .unwrap();
        assert_eq!(&buf, b"0123456789");
        // The key stays out of Debug.
        let dbg = format!("{g3:?}");
        assert!(dbg.contains(&g3.id_hex()) && !dbg.contains("1111"), "{dbg}");
    }

    #[test]
    fn compression_is_kept_only_when_smaller_and_decompression_is_exact() {
        let kv: Vec<u8> = (0..65536u32).map(|i| (i / 64) as u8 & 0x0f).collect();
        for comp in [Compression::Lz4, Compression::Zstd] {
            let mut c = Compressor::new(comp, 3);
            let mut out = vec![0u8; c.room(kv.len())];
            let n = c.compress(&kv, &mut out).expect("compresses");
            assert!(n < kv.len() / 4, "{comp:?}: {n}");
            let mut back = vec![0u8; kv.len()];
            decompress(comp, &out[..n], &mut back).unwrap();
            assert_eq!(back, kv);
            // Short of or beyond the expected length: damage.
            let mut short = vec![0u8; kv.len() - 1];
            assert_eq!(
                decompress(comp, &out[..n], &mut short),
                Err(Refused::Damaged)
            );
            let mut long = vec![0u8; kv.len() + 1];
            assert_eq!(
                decompress(comp, &out[..n], &mut long),
                Err(Refused::Damaged)
            );
            // Incompressible and empty blocks stay as they are.
            let mut x = 0x2545_f491_4f6c_dd1d_u64;
            let random: Vec<u8> = (0..4096)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                })
                .collect();
            let mut out = vec![0u8; c.room(random.len())];
            assert_eq!(c.compress(&random, &mut out), None, "{comp:?}");
            assert_eq!(c.compress(&[], &mut out), None);
            assert_eq!(decompress(comp, b"junk", &mut back), Err(Refused::Damaged));
        }
        let mut none = Compressor::new(Compression::None, 3);
        assert_eq!(none.compress(&kv, &mut vec![0u8; kv.len()]), None);
    }

    #[test]
    fn key_files_are_32_bytes_or_64_hex_digits() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, content: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, content).unwrap();
            p
        };
        let read = |p: &Path| read_key_file(p, "disk_key_file");
        let hex: String = (0..32).map(|i| format!("{:02x}", i + 1)).collect();
        let want: Vec<u8> = (1..=32).collect();
        assert_eq!(read(&write("raw", &want)).unwrap().to_vec(), want);
        assert_eq!(read(&write("hex", hex.as_bytes())).unwrap().to_vec(), want);
        let nl = format!("{}\n", hex.to_uppercase());
        assert_eq!(read(&write("nl", nl.as_bytes())).unwrap().to_vec(), want);
        for (name, content) in [
            ("short", &b"0123"[..]),
            ("crlf", format!("{hex}\r\n").as_bytes()),
            ("two-newlines", format!("{hex}\n\n").as_bytes()),
            ("spaces", format!(" {hex}").as_bytes()),
            ("not-hex", "zz".repeat(32).as_bytes()),
            ("33", &[1u8; 33][..]),
            ("zero", &[0u8; 32][..]),
            ("empty", b""),
        ] {
            let err = read(&write(name, content)).unwrap_err().to_string();
            assert!(
                err.contains("disk_key_file") && err.contains(name),
                "{name}: {err}"
            );
            // The message never carries the content.
            assert!(!err.contains(&hex), "{err}");
        }
        let err = read(&dir.path().join("missing")).unwrap_err().to_string();
        assert!(err.contains("disk_key_file"), "{err}");
    }
}
