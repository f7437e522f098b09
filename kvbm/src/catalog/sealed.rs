//! Token ids at rest: a layer over the catalog that seals every block
//! record's token ids — the prompt, tokenized — under the disk key before
//! they are written, and opens them when they are read, so the store and
//! the tiers only ever see them in the clear and the catalog's files never
//! do.
//!
//! A record is usable only where it was sealed as this daemon seals: with a
//! key, a record whose token ids are in the clear (written before the key
//! was set) or do not open (another key, damaged, moved to another block)
//! is not handed out — a scan reports it as undecodable, so the store
//! deletes it, and its disk entry, unreadable here for the same reason, is
//! never read. Without a key, a sealed record is refused the same way.
//! Parent keys, block keys and the rest of a record stay in the clear.

use std::sync::Arc;

use super::{BlockRecord, Catalog, NamespaceRecord, RegionRecord};
use crate::error::Result;

/// Seals and opens a block's token ids, bound to the block: its namespace
/// id, key and parent key.
pub trait TokenSeal: Send + Sync {
    /// `None` when they cannot be sealed (no random nonce): the record
    /// must then not be written.
    fn seal(&self, ns: u32, key: &[u8], parent: &[u8], tokens: &[u32]) -> Option<Vec<u8>>;
    /// `None` when they do not open here.
    fn open(&self, ns: u32, key: &[u8], parent: &[u8], sealed: &[u8]) -> Option<Vec<u32>>;
}

/// The catalog, with token ids sealed at rest when `seal` is given.
pub struct SealedCatalog {
    inner: Arc<dyn Catalog>,
    seal: Option<Arc<dyn TokenSeal>>,
}

impl SealedCatalog {
    pub fn new(inner: Arc<dyn Catalog>, seal: Option<Arc<dyn TokenSeal>>) -> SealedCatalog {
        SealedCatalog { inner, seal }
    }

    /// The record as stored, or `None` when it cannot be sealed.
    fn sealed(&self, b: &BlockRecord) -> Option<BlockRecord> {
        let Some(s) = &self.seal else {
            return Some(b.clone());
        };
        let sealed_tokens = s.seal(b.ns, &b.key, &b.parent, &b.tokens)?;
        Some(BlockRecord {
            tokens: Vec::new(),
            sealed_tokens,
            ..b.clone()
        })
    }

    /// Turns a record as stored into the record as handed out; `false`
    /// when it is not usable here.
    fn open(&self, b: &mut BlockRecord) -> bool {
        match (&self.seal, b.sealed_tokens.is_empty()) {
            (None, true) => true,
            (Some(s), false) => match s.open(b.ns, &b.key, &b.parent, &b.sealed_tokens) {
                Some(tokens) => {
                    b.tokens = tokens;
                    b.sealed_tokens = Vec::new();
                    true
                }
                None => false,
            },
            (None, false) | (Some(_), true) => false,
        }
    }
}

impl Catalog for SealedCatalog {
    fn put_blocks(&self, blocks: &[BlockRecord], durable: bool) -> Result<()> {
        if self.seal.is_none() {
            return self.inner.put_blocks(blocks, durable);
        }
        let sealed: Vec<BlockRecord> = blocks.iter().filter_map(|b| self.sealed(b)).collect();
        if sealed.len() < blocks.len() {
            tracing::error!(
                dropped = blocks.len() - sealed.len(),
                "no random nonce to seal token ids: catalog records not written"
            );
        }
        self.inner.put_blocks(&sealed, durable)
    }

    fn get_block(&self, ns: u32, key: &[u8]) -> Result<Option<BlockRecord>> {
        Ok(self
            .inner
            .get_block(ns, key)?
            .and_then(|mut b| self.open(&mut b).then_some(b)))
    }

    fn delete_blocks(&self, keys: &[(u32, Vec<u8>)]) -> Result<()> {
        self.inner.delete_blocks(keys)
    }

    fn scan_blocks(
        &self,
        f: &mut dyn FnMut(BlockRecord),
        bad: &mut dyn FnMut(Vec<u8>),
    ) -> Result<()> {
        let mut refused = Vec::new();
        self.inner.scan_blocks(
            &mut |mut b| {
                if self.open(&mut b) {
                    f(b)
                } else {
                    refused.push(super::block_db_key(b.ns, &b.key))
                }
            },
            bad,
        )?;
        if !refused.is_empty() {
            tracing::warn!(
                refused = refused.len(),
                key = self.seal.is_some(),
                "catalog records whose token ids are not sealed as this daemon seals them \
                 (another disk key, none, or damaged): dropped with their disk copies"
            );
        }
        for k in refused {
            bad(k);
        }
        Ok(())
    }

    fn delete_raw_block_keys(&self, raw: &[Vec<u8>]) -> Result<()> {
        self.inner.delete_raw_block_keys(raw)
    }

    fn put_namespace(&self, ns: &NamespaceRecord) -> Result<()> {
        self.inner.put_namespace(ns)
    }

    fn namespaces(&self) -> Result<Vec<NamespaceRecord>> {
        self.inner.namespaces()
    }

    fn put_region(&self, region: RegionRecord) -> Result<()> {
        self.inner.put_region(region)
    }

    fn delete_region(&self, region: u32) -> Result<()> {
        self.inner.delete_region(region)
    }

    fn regions(&self) -> Result<Vec<RegionRecord>> {
        self.inner.regions()
    }

    fn put_remote(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.inner.put_remote(key, value)
    }

    fn delete_remote(&self, key: &[u8]) -> Result<()> {
        self.inner.delete_remote(key)
    }

    fn scan_remote(&self, f: &mut dyn FnMut(&[u8], &[u8])) -> Result<()> {
        self.inner.scan_remote(f)
    }

    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }
}

#[cfg(all(test, feature = "rocksdb", feature = "at-rest"))]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::catalog::rocks::RocksCatalog;
    use crate::config::Compression;
    use crate::disk::DiskCodec;

    const KEY_A: [u8; 32] = [0x5a; 32];
    const KEY_B: [u8; 32] = [0xa5; 32];

    /// Token ids no other field of a record is likely to hold.
    fn tokens(i: u8) -> Vec<u32> {
        (0..16)
            .map(|t| 0x5eed_0000 + u32::from(i) * 16 + t)
            .collect()
    }

    fn record(i: u8) -> BlockRecord {
        BlockRecord {
            ns: 3,
            key: vec![i; 32],
            parent: if i == 0 { vec![] } else { vec![i - 1; 32] },
            tokens: tokens(i),
            sealed_tokens: vec![],
            size: 4096,
            checksum: 0,
            disk: None,
            hits: 1,
        }
    }

    fn layer(dir: &Path, key: Option<&[u8; 32]>) -> SealedCatalog {
        let inner = Arc::new(RocksCatalog::open(dir).expect("open catalog"));
        let seal = key
            .map(|k| Arc::new(DiskCodec::new(Compression::None, 3, Some(k))) as Arc<dyn TokenSeal>);
        SealedCatalog::new(inner, seal)
    }

    /// The usable records, and the catalog keys of the refused ones.
    fn scan(c: &SealedCatalog) -> (Vec<BlockRecord>, Vec<Vec<u8>>) {
        let (mut ok, mut bad) = (Vec::new(), Vec::new());
        c.scan_blocks(&mut |b| ok.push(b), &mut |k| bad.push(k))
            .expect("scan");
        (ok, bad)
    }

    /// Whether any file under `dir` holds block `i`'s token ids in the
    /// clear (u32 LE, as the clear format stores them).
    fn tokens_in_files(dir: &Path, i: u8) -> bool {
        let run: Vec<u8> = tokens(i).iter().flat_map(|t| t.to_le_bytes()).collect();
        std::fs::read_dir(dir).expect("list").any(|e| {
            let bytes = std::fs::read(e.expect("entry").path()).unwrap_or_default();
            bytes.windows(run.len()).any(|w| w == run)
        })
    }

    #[test]
    fn token_ids_are_sealed_at_rest_and_open_only_under_their_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("catalog");
        {
            let c = layer(&db, Some(&KEY_A));
            c.put_blocks(&[record(0), record(1)], true).expect("put");
            c.put_blocks(&[record(2)], false).expect("put memory-only");
            assert_eq!(c.get_block(3, &[1; 32]).unwrap(), Some(record(1)));
            let (ok, bad) = scan(&c);
            assert_eq!((ok.len(), bad.len()), (3, 0));
            assert!(ok.contains(&record(2)));
            c.sync().expect("sync");
            // The log, while open: sealed.
            for i in 0..3 {
                assert!(!tokens_in_files(&db, i), "block {i}'s tokens in the log");
            }
        }
        // Closed (memtables flushed to tables): still sealed.
        for i in 0..3 {
            assert!(!tokens_in_files(&db, i), "block {i}'s tokens in the files");
        }
        // Another key, or none: nothing usable, everything reported for
        // deletion; the records themselves untouched.
        for key in [Some(&KEY_B), None] {
            let c = layer(&db, key);
            assert_eq!(c.get_block(3, &[1; 32]).unwrap(), None);
            let (ok, bad) = scan(&c);
            assert_eq!((ok.len(), bad.len()), (0, 3), "key {}", key.is_some());
            assert!(bad.contains(&crate::catalog::block_db_key(3, &[1; 32])));
        }
        // A record written in the clear (no key) is refused under one.
        layer(&db, None)
            .put_blocks(&[record(5)], true)
            .expect("put");
        {
            let c = layer(&db, Some(&KEY_A));
            assert_eq!(c.get_block(3, &[5; 32]).unwrap(), None);
            let (ok, bad) = scan(&c);
            assert_eq!((ok.len(), bad.len()), (3, 1));
            assert_eq!(bad[0], crate::catalog::block_db_key(3, &[5; 32]));
        }
        // Sealed token ids moved to another block, or a parent rewritten:
        // refused.
        let inner = Arc::new(RocksCatalog::open(&db).expect("open"));
        let stored = inner.get_block(3, &[1; 32]).unwrap().unwrap();
        assert!(stored.tokens.is_empty() && !stored.sealed_tokens.is_empty());
        let moved = BlockRecord {
            key: vec![0; 32],
            parent: vec![],
            ..stored.clone()
        };
        let reparented = BlockRecord {
            parent: vec![9; 32],
            ..stored
        };
        inner.put_blocks(&[moved, reparented], true).expect("put");
        let c = SealedCatalog::new(
            inner,
            Some(Arc::new(DiskCodec::new(Compression::None, 3, Some(&KEY_A)))),
        );
        assert_eq!(c.get_block(3, &[0; 32]).unwrap(), None);
        assert_eq!(c.get_block(3, &[1; 32]).unwrap(), None);
        assert_eq!(c.get_block(3, &[2; 32]).unwrap(), Some(record(2)));
    }

    #[test]
    fn without_a_key_token_ids_are_in_the_clear() {
        // The control of the test above: its search finds clear tokens.
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("catalog");
        let c = layer(&db, None);
        c.put_blocks(&[record(7)], true).expect("put");
        c.sync().expect("sync");
        assert!(tokens_in_files(&db, 7));
        assert_eq!(c.get_block(3, &[7; 32]).unwrap(), Some(record(7)));
    }
}
