//! How G3 entries are stored at rest: compressed (lz4, zstd) where that
//! makes them smaller, then encrypted (AES-256-GCM) under the disk key,
//! both recorded in the entry header (format in [`super::entry`]); and the
//! catalog's token ids sealed under the same key ([`TokenSeal`]).
//!
//! - The key file (`disk_key_file`) may be the G4 one: G3 derives its own
//!   block key and key id from it (HKDF salt `kvtier-g3`, see
//!   [`crate::at_rest`]), so what one tier sealed never opens in the other.
//! - An entry's associated data binds the namespace id, the block key, the
//!   region generation and entry offset, the codec byte and both lengths:
//!   an entry copied to another place, or its header rewritten to name
//!   another block or to decode it differently, fails authentication.
//! - Reading follows the entry's codec byte, not the tier's settings (a
//!   tier set to lz4 reads zstd entries and entries stored as is). With a
//!   key, only entries encrypted under it are served; without one, an
//!   encrypted entry never is. Decompression writes into the caller's
//!   buffer of exactly the raw length the caller expects, nothing larger.
//! - Encoding and decoding run on the ring threads, between submissions:
//!   a codec costs CPU there (see `docs/kvbm.md`), none on the caller's
//!   thread. Without a codec nothing here runs.
//!
//! Without the `at-rest` feature the types below are uninhabited (no tier
//! ever has a codec: the configuration refuses one) and an encoded entry
//! is never served.

#[cfg(feature = "at-rest")]
pub use imp::*;
#[cfg(not(feature = "at-rest"))]
pub use off::*;

#[cfg(feature = "at-rest")]
mod imp {
    use std::sync::Arc;

    use super::super::entry::{Header, Seal, CODEC_ENCRYPTED, CODEC_LZ4, CODEC_ZSTD};
    use super::super::DiskError;
    use crate::at_rest::{self, Compressor, Refused, Scheme, KEY_LEN};
    use crate::catalog::TokenSeal;
    use crate::config::{Compression, Config};
    use crate::error::Result;

    /// G3's HKDF salt: its block key and key id, whatever else uses the
    /// same key file.
    const SALT: &[u8] = b"kvtier-g3";
    /// What an entry's associated data starts with.
    const ENTRY_DOMAIN: &[u8] = b"kvtier-g3-entry";
    /// What the associated data of a catalog record's token ids starts
    /// with.
    const TOKENS_DOMAIN: &[u8] = b"kvtier-g3-tokens";

    /// How this tier stores entries. Built once; shared by the ring threads
    /// and the catalog.
    #[derive(Debug)]
    pub struct DiskCodec {
        scheme: Scheme,
    }

    impl DiskCodec {
        /// A codec with `key` (a key file's 32 bytes) or none.
        pub fn new(
            compression: Compression,
            zstd_level: i32,
            key: Option<&[u8; KEY_LEN]>,
        ) -> DiskCodec {
            DiskCodec {
                scheme: Scheme::new(compression, zstd_level, key, SALT),
            }
        }

        /// The codec `cfg` asks for, its key read from `disk_key_file`;
        /// `None` when entries are stored as they are.
        pub fn from_config(cfg: &Config) -> Result<Option<Arc<DiskCodec>>> {
            let key = match &cfg.disk_key_file {
                Some(path) => Some(at_rest::read_key_file(path, "disk_key_file")?),
                None => None,
            };
            let codec = DiskCodec::new(cfg.disk_compression, cfg.disk_zstd_level, key.as_ref());
            Ok((!codec.scheme.is_noop()).then(|| Arc::new(codec)))
        }

        /// Whether entries (and the catalog's token ids) are encrypted, and
        /// only encrypted entries read.
        pub fn encrypts(&self) -> bool {
            self.scheme.sealer.is_some()
        }

        /// The key's id, as stored in each encrypted entry (hex), for logs.
        pub fn key_id(&self) -> Option<String> {
            self.scheme.key_id()
        }

        /// An encoder for one ring thread (it keeps compression state).
        pub fn encoder(self: &Arc<Self>) -> Encoder {
            Encoder {
                compressor: self.scheme.compressor(),
                codec: self.clone(),
            }
        }
    }

    /// Encodes the entries one ring thread writes.
    pub struct Encoder {
        codec: Arc<DiskCodec>,
        compressor: Compressor,
    }

    impl Encoder {
        /// Bytes of buffer [`Encoder::compress`] needs for a block of
        /// `raw_len` bytes.
        pub fn room(&self, raw_len: usize) -> usize {
            self.compressor.room(raw_len).max(raw_len)
        }

        /// Puts `raw`'s stored form into `out` (at least
        /// [`Encoder::room`] long): compressed where that makes it smaller,
        /// else a copy. The compression bits and the stored length.
        pub fn compress(&mut self, raw: &[u8], out: &mut [u8]) -> (u8, usize) {
            let bits = match self.codec.scheme.compression {
                Compression::None => 0,
                Compression::Lz4 => CODEC_LZ4,
                Compression::Zstd => CODEC_ZSTD,
            };
            match self.compressor.compress(raw, out) {
                Some(n) => (bits, n),
                None => {
                    out[..raw.len()].copy_from_slice(raw);
                    (0, raw.len())
                }
            }
        }

        /// Encrypts `stored` in place when the tier has a key, and records
        /// the seal in `h`, whose other fields must be final (they are the
        /// associated data). `None` when no random nonce could be had: the
        /// entry must not be written.
        pub fn seal(&self, h: &mut Header, stored: &mut [u8]) -> Option<()> {
            let Some(s) = &self.codec.scheme.sealer else {
                return Some(());
            };
            let (nonce, tag) = s.seal_in_place(&entry_aad(h), stored)?;
            h.sealed = Some(Seal {
                key_id: *s.id(),
                nonce,
                tag,
            });
            Some(())
        }
    }

    /// Decodes an entry whose stored bytes (their checksum verified) are in
    /// `stored`: into `dst` (exactly the raw length) when given, otherwise
    /// in place (then the entry is not compressed: `stored` is the
    /// destination). `Foreign` when it is not encrypted as `codec` requires
    /// or under another key, `Undecodable` when it fails authentication or
    /// does not decompress to exactly its raw length.
    pub fn open(
        codec: Option<&DiskCodec>,
        h: &Header,
        stored: &mut [u8],
        dst: Option<&mut [u8]>,
    ) -> std::result::Result<(), DiskError> {
        let sealer = codec.and_then(|c| c.scheme.sealer.as_ref());
        match (&h.sealed, sealer) {
            (Some(seal), Some(s)) => s
                .open_in_place(&seal.key_id, &seal.nonce, &seal.tag, &entry_aad(h), stored)
                .map_err(refused)?,
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => return Err(DiskError::Foreign),
        }
        let compression = match h.compression {
            0 => None,
            CODEC_LZ4 => Some(Compression::Lz4),
            CODEC_ZSTD => Some(Compression::Zstd),
            _ => return Err(DiskError::Undecodable),
        };
        match (compression, dst) {
            (None, None) => Ok(()),
            (None, Some(d)) if d.len() == stored.len() => {
                d.copy_from_slice(stored);
                Ok(())
            }
            (Some(c), Some(d)) => at_rest::decompress(c, stored, d).map_err(refused),
            _ => Err(DiskError::Undecodable),
        }
    }

    fn refused(r: Refused) -> DiskError {
        match r {
            Refused::Foreign => DiskError::Foreign,
            Refused::Layout | Refused::Damaged => DiskError::Undecodable,
        }
    }

    /// The associated data of an encrypted entry: which block it is, where,
    /// and how it is stored.
    fn entry_aad(h: &Header) -> Vec<u8> {
        let mut a = Vec::with_capacity(ENTRY_DOMAIN.len() + 30 + h.key.len());
        a.extend_from_slice(ENTRY_DOMAIN);
        a.extend_from_slice(&h.namespace.to_le_bytes());
        a.extend_from_slice(&h.generation.to_le_bytes());
        a.extend_from_slice(&h.offset.to_le_bytes());
        a.push(h.compression | CODEC_ENCRYPTED);
        a.extend_from_slice(&h.raw_len.to_le_bytes());
        a.extend_from_slice(&h.len.to_le_bytes());
        a.push(h.key.len() as u8);
        a.extend_from_slice(&h.key);
        a
    }

    /// The associated data of a block's sealed token ids: which block, and
    /// what it follows.
    fn tokens_aad(ns: u32, key: &[u8], parent: &[u8]) -> Vec<u8> {
        let mut a = Vec::with_capacity(TOKENS_DOMAIN.len() + 12 + key.len() + parent.len());
        a.extend_from_slice(TOKENS_DOMAIN);
        a.extend_from_slice(&ns.to_le_bytes());
        for part in [key, parent] {
            a.extend_from_slice(&(part.len() as u32).to_le_bytes());
            a.extend_from_slice(part);
        }
        a
    }

    impl TokenSeal for DiskCodec {
        fn seal(&self, ns: u32, key: &[u8], parent: &[u8], tokens: &[u32]) -> Option<Vec<u8>> {
            let plain: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
            self.scheme
                .sealer
                .as_ref()?
                .seal(&tokens_aad(ns, key, parent), &plain)
        }

        fn open(&self, ns: u32, key: &[u8], parent: &[u8], sealed: &[u8]) -> Option<Vec<u32>> {
            let plain = self
                .scheme
                .sealer
                .as_ref()?
                .open(&tokens_aad(ns, key, parent), sealed)
                .ok()?;
            (plain.len() % 4 == 0).then(|| {
                plain
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            })
        }
    }
}

/// Without the codec: no tier has one, and an encoded entry is a miss.
#[cfg(not(feature = "at-rest"))]
mod off {
    use std::sync::Arc;

    use super::super::entry::Header;
    use super::super::DiskError;
    use crate::catalog::TokenSeal;
    use crate::config::Config;
    use crate::error::Result;

    #[derive(Debug)]
    pub enum DiskCodec {}

    pub enum Encoder {}

    impl DiskCodec {
        /// Always `None`: the configuration refuses a key or compression
        /// in a build without the codec.
        pub fn from_config(_: &Config) -> Result<Option<Arc<DiskCodec>>> {
            Ok(None)
        }

        pub fn encrypts(&self) -> bool {
            match *self {}
        }

        pub fn key_id(&self) -> Option<String> {
            match *self {}
        }

        pub fn encoder(self: &Arc<Self>) -> Encoder {
            match **self {}
        }
    }

    impl Encoder {
        pub fn room(&self, _: usize) -> usize {
            match *self {}
        }

        pub fn compress(&mut self, _: &[u8], _: &mut [u8]) -> (u8, usize) {
            match *self {}
        }

        pub fn seal(&self, _: &mut Header, _: &mut [u8]) -> Option<()> {
            match *self {}
        }
    }

    impl TokenSeal for DiskCodec {
        fn seal(&self, _: u32, _: &[u8], _: &[u8], _: &[u32]) -> Option<Vec<u8>> {
            match *self {}
        }

        fn open(&self, _: u32, _: &[u8], _: &[u8], _: &[u8]) -> Option<Vec<u32>> {
            match *self {}
        }
    }

    /// An entry stored as is decodes; any other is not readable here.
    pub fn open(
        _: Option<&DiskCodec>,
        h: &Header,
        stored: &mut [u8],
        dst: Option<&mut [u8]>,
    ) -> std::result::Result<(), DiskError> {
        if h.codec() != 0 {
            return Err(DiskError::Foreign);
        }
        match dst {
            None => Ok(()),
            Some(d) if d.len() == stored.len() => {
                d.copy_from_slice(stored);
                Ok(())
            }
            Some(_) => Err(DiskError::Undecodable),
        }
    }
}

#[cfg(all(test, feature = "at-rest"))]
mod tests {
    use super::super::entry::{AlignedBuf, Header, CODEC_LZ4, CODEC_ZSTD};
    use super::super::DiskError;
    use super::*;
    use crate::config::Compression;
    use std::sync::Arc;

    /// An lz4-compressed, encrypted entry: its header and stored bytes.
    fn sealed_entry(codec: &Arc<DiskCodec>) -> (Header, Vec<u8>, Vec<u8>) {
        let raw: Vec<u8> = (0..8192u32).map(|i| (i / 32) as u8).collect();
        let mut enc = codec.encoder();
        let mut buf = AlignedBuf::new(enc.room(raw.len())).unwrap();
        let (compression, n) = enc.compress(&raw, &mut buf);
        assert_eq!(compression, CODEC_LZ4);
        let mut h = Header {
            raw_len: raw.len() as u32,
            compression,
            ..Header::plain(7, 3, 1 << 20, n as u32, 0, vec![0xab; 32])
        };
        enc.seal(&mut h, &mut buf[..n]).unwrap();
        (h, buf[..n].to_vec(), raw)
    }

    #[test]
    fn the_associated_data_binds_every_field_that_names_or_decodes_an_entry() {
        let codec = Arc::new(DiskCodec::new(Compression::Lz4, 3, Some(&[0x5a; 32])));
        let (h, stored, raw) = sealed_entry(&codec);
        let try_open = |h: &Header| {
            let mut s = stored.clone();
            let mut out = vec![0u8; h.raw_len as usize];
            open(Some(&codec), h, &mut s, Some(&mut out)).map(|()| out)
        };
        assert!(try_open(&h).is_ok_and(|out| out == raw));
        let changed: [(&str, Header); 7] = [
            (
                "namespace",
                Header {
                    namespace: 8,
                    ..h.clone()
                },
            ),
            (
                "generation",
                Header {
                    generation: 4,
                    ..h.clone()
                },
            ),
            (
                "offset",
                Header {
                    offset: 2 << 20,
                    ..h.clone()
                },
            ),
            (
                "key",
                Header {
                    key: vec![0xac; 32],
                    ..h.clone()
                },
            ),
            (
                "raw length",
                Header {
                    raw_len: 8193,
                    ..h.clone()
                },
            ),
            (
                "stored length",
                Header {
                    len: h.len - 1,
                    ..h.clone()
                },
            ),
            (
                "compression",
                Header {
                    compression: CODEC_ZSTD,
                    ..h.clone()
                },
            ),
        ];
        for (what, bad) in changed {
            assert!(
                matches!(try_open(&bad), Err(DiskError::Undecodable)),
                "{what} not bound"
            );
        }
        // Another key, or no key.
        let other = DiskCodec::new(Compression::Lz4, 3, Some(&[0xa5; 32]));
        let mut s = stored.clone();
        let mut out = vec![0u8; 8192];
        assert!(matches!(
            super::open(Some(&other), &h, &mut s, Some(&mut out)),
            Err(DiskError::Foreign)
        ));
        assert!(matches!(
            super::open(None, &h, &mut s, Some(&mut out)),
            Err(DiskError::Foreign)
        ));
        // The same key file gives G4 another key.
        #[cfg(feature = "remote")]
        {
            let g4 = crate::remote::codec::Codec::new(Compression::Lz4, 3, Some(&[0x5a; 32]));
            assert_ne!(g4.key_id(), codec.key_id(), "one key file, two tiers");
        }
    }
}
