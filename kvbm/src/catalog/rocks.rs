//! The RocksDB catalog: one database under `<data-dir>/catalog`, a column
//! family per record kind.

use std::path::Path;

use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use super::{
    block_db_key, decode_block, encode_block, BlockRecord, Catalog, NamespaceRecord, RegionRecord,
};
use crate::error::{Error, ErrorKind, Result};

const CF_BLOCKS: &str = "blocks";
const CF_NAMESPACES: &str = "namespaces";
const CF_REGIONS: &str = "regions";

pub struct RocksCatalog {
    db: DB,
}

impl RocksCatalog {
    pub fn open(dir: &Path) -> Result<RocksCatalog> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // The catalog is small next to the data; keep RocksDB's own
        // footprint modest.
        opts.set_max_background_jobs(2);
        opts.set_write_buffer_size(32 << 20);
        let cfs = [CF_BLOCKS, CF_NAMESPACES, CF_REGIONS]
            .into_iter()
            .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|e| {
            Error::new(
                ErrorKind::Catalog,
                format!("cannot open catalog {}: {e}", dir.display()),
            )
        })?;
        Ok(RocksCatalog { db })
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| Error::new(ErrorKind::Internal, format!("missing column family {name}")))
    }

    fn write(&self, batch: WriteBatch, durable: bool) -> Result<()> {
        let mut wo = WriteOptions::default();
        // Memory-only blocks need no log: a crash loses them anyway, and
        // recovery deletes records that have no disk location.
        wo.disable_wal(!durable);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }
}

impl Catalog for RocksCatalog {
    fn put_blocks(&self, blocks: &[BlockRecord], durable: bool) -> Result<()> {
        let cf = self.cf(CF_BLOCKS)?;
        let mut batch = WriteBatch::default();
        for b in blocks {
            batch.put_cf(cf, block_db_key(b.ns, &b.key), encode_block(b));
        }
        self.write(batch, durable)
    }

    fn get_block(&self, ns: u32, key: &[u8]) -> Result<Option<BlockRecord>> {
        let k = block_db_key(ns, key);
        match self.db.get_pinned_cf(self.cf(CF_BLOCKS)?, &k)? {
            Some(v) => Ok(Some(decode_block(&k, &v)?)),
            None => Ok(None),
        }
    }

    fn delete_blocks(&self, keys: &[(u32, Vec<u8>)]) -> Result<()> {
        let cf = self.cf(CF_BLOCKS)?;
        let mut batch = WriteBatch::default();
        for (ns, key) in keys {
            batch.delete_cf(cf, block_db_key(*ns, key));
        }
        self.write(batch, true)
    }

    fn delete_raw_block_keys(&self, raw: &[Vec<u8>]) -> Result<()> {
        let cf = self.cf(CF_BLOCKS)?;
        let mut batch = WriteBatch::default();
        for k in raw {
            batch.delete_cf(cf, k);
        }
        self.write(batch, true)
    }

    fn scan_blocks(
        &self,
        f: &mut dyn FnMut(BlockRecord),
        bad: &mut dyn FnMut(Vec<u8>),
    ) -> Result<()> {
        for item in self
            .db
            .iterator_cf(self.cf(CF_BLOCKS)?, IteratorMode::Start)
        {
            let (k, v) = item?;
            match decode_block(&k, &v) {
                Ok(b) => f(b),
                Err(_) => bad(k.to_vec()),
            }
        }
        Ok(())
    }

    fn put_namespace(&self, ns: &NamespaceRecord) -> Result<()> {
        let mut v = Vec::with_capacity(16 + ns.name.len() + ns.layout.len());
        v.extend_from_slice(&ns.id.to_le_bytes());
        v.extend_from_slice(&ns.block_bytes.to_le_bytes());
        v.extend_from_slice(&ns.layout);
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_NAMESPACES)?, ns.name.as_bytes(), v);
        self.write(batch, true)?;
        self.sync()
    }

    fn namespaces(&self) -> Result<Vec<NamespaceRecord>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_NAMESPACES)?, IteratorMode::Start)
        {
            let (k, v) = item?;
            if v.len() < 12 {
                return Err(Error::new(ErrorKind::Catalog, "truncated namespace record"));
            }
            let name = String::from_utf8(k.to_vec())
                .map_err(|_| Error::new(ErrorKind::Catalog, "namespace name is not UTF-8"))?;
            out.push(NamespaceRecord {
                id: u32::from_le_bytes([v[0], v[1], v[2], v[3]]),
                block_bytes: u64::from_le_bytes([v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11]]),
                layout: v[12..].to_vec(),
                name,
            });
        }
        Ok(out)
    }

    fn put_region(&self, r: RegionRecord) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_REGIONS)?,
            r.region.to_be_bytes(),
            r.generation.to_le_bytes(),
        );
        self.write(batch, true)
    }

    fn delete_region(&self, region: u32) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_REGIONS)?, region.to_be_bytes());
        self.write(batch, true)
    }

    fn regions(&self) -> Result<Vec<RegionRecord>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_REGIONS)?, IteratorMode::Start)
        {
            let (k, v) = item?;
            if k.len() != 4 || v.len() != 8 {
                return Err(Error::new(ErrorKind::Catalog, "malformed region record"));
            }
            out.push(RegionRecord {
                region: u32::from_be_bytes([k[0], k[1], k[2], k[3]]),
                generation: u64::from_le_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]]),
            });
        }
        Ok(out)
    }

    fn sync(&self) -> Result<()> {
        self.db.flush_wal(true)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(ns: u32, key: u8) -> BlockRecord {
        BlockRecord {
            ns,
            key: vec![key; 8],
            parent: vec![],
            tokens: vec![1, 2, 3],
            size: 4096,
            checksum: 0,
            disk: None,
            hits: 0,
        }
    }

    #[test]
    fn blocks_namespaces_regions_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = RocksCatalog::open(dir.path()).unwrap();
            c.put_blocks(&[block(1, 1), block(1, 2), block(2, 1)], true)
                .unwrap();
            c.delete_blocks(&[(1, vec![2; 8])]).unwrap();
            c.put_namespace(&NamespaceRecord {
                id: 1,
                name: "m".into(),
                block_bytes: 4096,
                layout: vec![9, 9],
            })
            .unwrap();
            c.put_region(RegionRecord {
                region: 4,
                generation: 11,
            })
            .unwrap();
            c.sync().unwrap();
        }
        let c = RocksCatalog::open(dir.path()).unwrap();
        let mut seen = Vec::new();
        c.scan_blocks(&mut |b| seen.push((b.ns, b.key[0])), &mut |_| {})
            .unwrap();
        assert_eq!(seen, vec![(1, 1), (2, 1)]);
        assert_eq!(c.get_block(2, &[1; 8]).unwrap(), Some(block(2, 1)));
        assert_eq!(c.namespaces().unwrap()[0].layout, vec![9, 9]);
        assert_eq!(
            c.regions().unwrap(),
            vec![RegionRecord {
                region: 4,
                generation: 11
            }]
        );
    }
}
