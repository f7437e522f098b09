//! The catalog: durable metadata of namespaces, blocks, disk regions and
//! object-store segments.
//!
//! Behind the [`Catalog`] trait so the store does not depend on RocksDB (the
//! one implementation, [`rocks::RocksCatalog`]). Block bytes never go here:
//! only what is needed to find, verify and describe them after a restart.
//! The store reaches it through [`SealedCatalog`], which seals block
//! records' token ids under the disk key when one is set.

#[cfg(feature = "rocksdb")]
mod damage;
#[cfg(feature = "rocksdb")]
pub mod rocks;
mod sealed;

#[cfg(feature = "rocksdb")]
pub use damage::Damage;
pub use sealed::{SealedCatalog, TokenSeal};

use crate::error::{Error, Result};

/// Where a block's bytes live on the disk tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskLoc {
    pub region: u32,
    /// The region's generation when written: a recycled region has a newer
    /// one, and a location with an old generation is stale.
    pub generation: u64,
    pub offset: u64,
    pub len: u32,
}

/// Everything kvbm keeps about a block besides its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRecord {
    pub ns: u32,
    pub key: Vec<u8>,
    pub parent: Vec<u8>,
    pub tokens: Vec<u32>,
    /// The token ids sealed under the disk key, as the catalog keeps them
    /// when one is set (then `tokens` is empty). Only the catalog's own
    /// layers see these: [`SealedCatalog`] hands out `tokens`.
    pub sealed_tokens: Vec<u8>,
    pub size: u64,
    /// xxh3-64 of the bytes; 0 until the block was written to disk.
    pub checksum: u64,
    pub disk: Option<DiskLoc>,
    pub hits: u32,
}

/// A registered namespace: name, id, block size, layout (encoded proto).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceRecord {
    pub id: u32,
    pub name: String,
    pub block_bytes: u64,
    /// The `kvtier.v1.Layout` message, protobuf-encoded.
    pub layout: Vec<u8>,
}

/// A disk region in use: sealed or being filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionRecord {
    pub region: u32,
    pub generation: u64,
}

pub trait Catalog: Send + Sync {
    /// Writes block records. `durable`: the write is in the catalog's log
    /// (fsynced by [`Catalog::sync`]); otherwise it may be lost in a crash,
    /// which is fine for blocks that only live in memory.
    fn put_blocks(&self, blocks: &[BlockRecord], durable: bool) -> Result<()>;
    fn get_block(&self, ns: u32, key: &[u8]) -> Result<Option<BlockRecord>>;
    fn delete_blocks(&self, keys: &[(u32, Vec<u8>)]) -> Result<()>;
    /// Calls `f` for every block record; undecodable records are reported
    /// through `bad` (their keys) so the caller can delete them.
    fn scan_blocks(
        &self,
        f: &mut dyn FnMut(BlockRecord),
        bad: &mut dyn FnMut(Vec<u8>),
    ) -> Result<()>;
    fn delete_raw_block_keys(&self, raw: &[Vec<u8>]) -> Result<()>;

    fn put_namespace(&self, ns: &NamespaceRecord) -> Result<()>;
    fn namespaces(&self) -> Result<Vec<NamespaceRecord>>;

    fn put_region(&self, region: RegionRecord) -> Result<()>;
    fn delete_region(&self, region: u32) -> Result<()>;
    fn regions(&self) -> Result<Vec<RegionRecord>>;

    /// The object-store tier's records (segments this node knows, its node
    /// id), opaque to the catalog: [`crate::remote::tier`] encodes them.
    fn put_remote(&self, key: &[u8], value: &[u8]) -> Result<()>;
    fn delete_remote(&self, key: &[u8]) -> Result<()>;
    fn scan_remote(&self, f: &mut dyn FnMut(&[u8], &[u8])) -> Result<()>;

    /// Makes every durable write so far survive a crash.
    fn sync(&self) -> Result<()>;
}

// --- record encoding -------------------------------------------------------
//
// A small fixed binary format, versioned by its first byte, so the catalog
// needs no schema library and decoding a corrupt value is an error, not a
// panic.
//
//   version   u8: 1 token ids in the clear, 2 token ids sealed
//   size      u64 LE
//   checksum  u64 LE
//   hits      u32 LE
//   disk      u8 0, or 1 then region u32, generation u64, offset u64,
//             len u32 (LE)
//   parent    u8 length, bytes
//   version 1: u32 LE count, then the token ids (u32 LE each)
//   version 2: u32 LE length (at least 1), then the sealed bytes

const BLOCK_V1: u8 = 1;
const BLOCK_SEALED: u8 = 2;

/// The catalog key of block `key` of namespace `ns`: `ns` big-endian, then
/// the key bytes (so one namespace's blocks are contiguous).
pub fn block_db_key(ns: u32, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + key.len());
    k.extend_from_slice(&ns.to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// The catalog value of a block record (the format above: version 2 when
/// it carries sealed token ids; the namespace and key travel in the catalog
/// key, see [`block_db_key`]).
pub fn encode_block(b: &BlockRecord) -> Vec<u8> {
    let sealed = !b.sealed_tokens.is_empty();
    let mut v =
        Vec::with_capacity(64 + b.parent.len() + 4 * b.tokens.len() + b.sealed_tokens.len());
    v.push(if sealed { BLOCK_SEALED } else { BLOCK_V1 });
    v.extend_from_slice(&b.size.to_le_bytes());
    v.extend_from_slice(&b.checksum.to_le_bytes());
    v.extend_from_slice(&b.hits.to_le_bytes());
    match b.disk {
        Some(d) => {
            v.push(1);
            v.extend_from_slice(&d.region.to_le_bytes());
            v.extend_from_slice(&d.generation.to_le_bytes());
            v.extend_from_slice(&d.offset.to_le_bytes());
            v.extend_from_slice(&d.len.to_le_bytes());
        }
        None => v.push(0),
    }
    v.push(b.parent.len() as u8);
    v.extend_from_slice(&b.parent);
    if sealed {
        v.extend_from_slice(&(b.sealed_tokens.len() as u32).to_le_bytes());
        v.extend_from_slice(&b.sealed_tokens);
    } else {
        v.extend_from_slice(&(b.tokens.len() as u32).to_le_bytes());
        for t in &b.tokens {
            v.extend_from_slice(&t.to_le_bytes());
        }
    }
    v
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(Error::new(
                crate::error::ErrorKind::Catalog,
                "truncated catalog record",
            ));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

/// Decodes a block record from its catalog key and value, as read back from
/// disk: anything malformed is a [`Catalog`](crate::error::ErrorKind::Catalog)
/// error, never a panic.
pub fn decode_block(db_key: &[u8], value: &[u8]) -> Result<BlockRecord> {
    let bad = |what: &str| Error::new(crate::error::ErrorKind::Catalog, what.to_string());
    if db_key.len() < 5 || db_key.len() > 4 + 32 {
        return Err(bad("catalog block key of invalid length"));
    }
    let ns = u32::from_be_bytes([db_key[0], db_key[1], db_key[2], db_key[3]]);
    let mut r = Reader(value);
    let version = r.u8()?;
    if version != BLOCK_V1 && version != BLOCK_SEALED {
        return Err(bad("unknown catalog record version"));
    }
    let size = r.u64()?;
    let checksum = r.u64()?;
    let hits = r.u32()?;
    let disk = match r.u8()? {
        0 => None,
        1 => Some(DiskLoc {
            region: r.u32()?,
            generation: r.u64()?,
            offset: r.u64()?,
            len: r.u32()?,
        }),
        _ => return Err(bad("bad disk location tag in catalog record")),
    };
    let plen = r.u8()? as usize;
    let parent = r.take(plen)?.to_vec();
    let n = r.u32()? as usize;
    let (tokens, sealed_tokens) = if version == BLOCK_SEALED {
        if n == 0 {
            return Err(bad("empty sealed token ids"));
        }
        (Vec::new(), r.take(n)?.to_vec())
    } else {
        let raw = r.take(
            n.checked_mul(4)
                .ok_or_else(|| bad("token count overflow"))?,
        )?;
        let tokens = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (tokens, Vec::new())
    };
    Ok(BlockRecord {
        ns,
        key: db_key[4..].to_vec(),
        parent,
        tokens,
        sealed_tokens,
        size,
        checksum,
        disk,
        hits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_record_round_trip() {
        let b = BlockRecord {
            ns: 7,
            key: vec![1; 32],
            parent: vec![2; 32],
            tokens: (0..16).collect(),
            sealed_tokens: vec![],
            size: 2 << 20,
            checksum: 0xdead_beef,
            disk: Some(DiskLoc {
                region: 3,
                generation: 9,
                offset: 4096,
                len: 2 << 20,
            }),
            hits: 5,
        };
        let k = block_db_key(b.ns, &b.key);
        assert_eq!(decode_block(&k, &encode_block(&b)).unwrap(), b);
        // Every truncation is an error, never a panic.
        let v = encode_block(&b);
        for n in 0..v.len() {
            assert!(decode_block(&k, &v[..n]).is_err());
        }
        // Sealed token ids: version 2, back as they were.
        let sealed = BlockRecord {
            tokens: vec![],
            sealed_tokens: vec![0xab; 100],
            ..b
        };
        let v = encode_block(&sealed);
        assert_eq!(v[0], BLOCK_SEALED);
        assert_eq!(decode_block(&k, &v).unwrap(), sealed);
        for n in 0..v.len() {
            assert!(decode_block(&k, &v[..n]).is_err());
        }
        // An empty sealed field would re-encode as version 1: refused.
        let mut empty = v[..v.len() - 104].to_vec();
        empty.extend_from_slice(&0u32.to_le_bytes());
        assert!(decode_block(&k, &empty).is_err());
    }
}
