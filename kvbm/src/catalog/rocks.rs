//! The RocksDB catalog: one database under `<data-dir>/catalog`, a column
//! family per record kind.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use super::damage::{self, Damage, Failure};
use super::{
    block_db_key, decode_block, encode_block, BlockRecord, Catalog, NamespaceRecord, RegionRecord,
};
use crate::error::{Error, ErrorKind, Result};

const CF_BLOCKS: &str = "blocks";
const CF_NAMESPACES: &str = "namespaces";
const CF_REGIONS: &str = "regions";
const CF_REMOTE: &str = "remote";

pub struct RocksCatalog {
    db: DB,
    dir: PathBuf,
    /// Record the MANIFEST in the marker when closing: only for a catalog
    /// that opened and validated, never one found damaged.
    mark_on_close: bool,
    // After `db`: the database closes before the directory is released.
    _open: OpenHere,
}

impl RocksCatalog {
    /// Opens the catalog in `dir`, creating it if missing, and reads all of
    /// it once. Damage is an error; the daemon uses
    /// [`RocksCatalog::open_or_start_cold`] instead.
    pub fn open(dir: &Path) -> Result<RocksCatalog> {
        Self::open_checked(dir).map_err(|f| match f {
            Failure::Fatal(e) => e,
            Failure::Damage(reason) => Error::new(
                ErrorKind::Catalog,
                format!("catalog {} is damaged: {reason}", dir.display()),
            ),
        })
    }

    /// Opens the catalog in `dir` like [`RocksCatalog::open`], but a damaged
    /// one does not stop the daemon: it is renamed to
    /// `<dir>.damaged-<UTC time>` (kept, 0700), logged at ERROR, and an
    /// empty catalog takes its place, so kvbm starts cold. Errors remain for
    /// what is not damage: a catalog locked by a running daemon, a full
    /// disk, a directory kvbm may not use. See `catalog::damage`.
    pub fn open_or_start_cold(dir: &Path) -> Result<(RocksCatalog, Option<Damage>)> {
        let reason = match Self::open_checked(dir) {
            Ok(c) => return Ok((c, None)),
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Damage(reason)) => reason,
        };
        let moved_to = damage::move_aside(dir).map_err(|e| {
            Error::new(
                e.kind(),
                format!(
                    "catalog {} is damaged ({reason}) and was left in place: {e}",
                    dir.display()
                ),
            )
        })?;
        tracing::error!(
            catalog = %dir.display(),
            moved_to = %moved_to.display(),
            %reason,
            "catalog damaged: moved aside, starting cold with an empty catalog"
        );
        let c = Self::open(dir)?;
        Ok((c, Some(Damage { reason, moved_to })))
    }

    fn open_checked(dir: &Path) -> std::result::Result<RocksCatalog, Failure> {
        damage::usable_dir(dir).map_err(Failure::Fatal)?;
        // Before anything reads the files: a catalog this process has open
        // is in use, not damaged.
        let here = OpenHere::take(dir).map_err(Failure::Fatal)?;
        let existing = damage::precheck(dir)?;
        let mut opts = Options::default();
        // An existing catalog whose CURRENT is gone must fail, not become a
        // new database over the old files.
        opts.create_if_missing(!existing);
        opts.create_missing_column_families(true);
        // Verify what RocksDB reads at open (the default, stated because
        // damage detection relies on it).
        opts.set_paranoid_checks(true);
        // The catalog is small next to the data; keep RocksDB's own
        // footprint modest.
        opts.set_max_background_jobs(2);
        opts.set_write_buffer_size(32 << 20);
        let cfs = [CF_BLOCKS, CF_NAMESPACES, CF_REGIONS, CF_REMOTE]
            .into_iter()
            .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|e| {
            damage::classify(Error::new(
                ErrorKind::Catalog,
                format!("cannot open catalog {}: {e}", dir.display()),
            ))
        })?;
        let mut c = RocksCatalog {
            db,
            dir: dir.to_path_buf(),
            mark_on_close: false,
            _open: here,
        };
        damage::write_marker(dir).map_err(Failure::Fatal)?;
        // Read everything `Store::open` reads, so damage shows here, where
        // it can be moved aside, rather than as a start-up error there; the
        // blocks are scanned twice at start, the price of keeping the store
        // unaware of damage. Undecodable block records are not damage: the
        // store deletes them.
        c.namespaces().map_err(damage::classify)?;
        c.regions().map_err(damage::classify)?;
        c.scan_blocks(&mut |_| {}, &mut |_| {})
            .map_err(damage::classify)?;
        c.mark_on_close = true;
        Ok(c)
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

impl Drop for RocksCatalog {
    fn drop(&mut self) {
        if !self.mark_on_close {
            return;
        }
        // Flushes what was written without the log and stops flushes and
        // compactions, so no MANIFEST edit is half-written when the marker
        // records its size.
        self.db.cancel_all_background_work(true);
        if let Err(e) = damage::write_marker(&self.dir) {
            tracing::warn!(error = %e, "cannot update the catalog marker");
        }
    }
}

/// Catalog directories open in this process. RocksDB refuses a second open
/// itself, but the lock probe that guards moving a damaged catalog aside
/// cannot see this process's own lock, and closing the probe would drop it.
static OPEN_HERE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

struct OpenHere(PathBuf);

impl OpenHere {
    fn take(dir: &Path) -> Result<OpenHere> {
        let path = dir
            .canonicalize()
            .map_err(|e| Error::io(format!("catalog {}", dir.display()), e))?;
        let mut open = OPEN_HERE.lock().unwrap_or_else(|e| e.into_inner());
        if open.contains(&path) {
            return Err(Error::new(
                ErrorKind::Catalog,
                format!("catalog {} is already open in this process", dir.display()),
            ));
        }
        open.push(path.clone());
        Ok(OpenHere(path))
    }
}

impl Drop for OpenHere {
    fn drop(&mut self) {
        let mut open = OPEN_HERE.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|p| p != &self.0);
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

    fn put_remote(&self, key: &[u8], value: &[u8]) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_REMOTE)?, key, value);
        self.write(batch, true)
    }

    fn delete_remote(&self, key: &[u8]) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_REMOTE)?, key);
        self.write(batch, true)
    }

    fn scan_remote(&self, f: &mut dyn FnMut(&[u8], &[u8])) -> Result<()> {
        for item in self
            .db
            .iterator_cf(self.cf(CF_REMOTE)?, IteratorMode::Start)
        {
            let (k, v) = item?;
            f(&k, &v);
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.db.flush_wal(true)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn block(ns: u32, key: u8) -> BlockRecord {
        BlockRecord {
            ns,
            key: vec![key; 8],
            parent: vec![],
            tokens: vec![1, 2, 3],
            sealed_tokens: vec![],
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

    // --- damage -----------------------------------------------------------
    //
    // Each case is a real RocksDB in a temporary directory, damaged the way
    // an outside test damaged kvbm's, then opened as the daemon opens it.

    fn namespace() -> NamespaceRecord {
        NamespaceRecord {
            id: 1,
            name: "m".into(),
            block_bytes: 4096,
            layout: vec![9, 9],
        }
    }

    /// A catalog at `<root>/catalog` with a namespace, a region and `n`
    /// blocks, opened twice so its records sit in table files (RocksDB
    /// flushes the log it recovers at open).
    fn seeded(root: &Path, n: u32) -> PathBuf {
        let dir = root.join("catalog");
        {
            let (c, damage) = RocksCatalog::open_or_start_cold(&dir).unwrap();
            assert_eq!(damage, None);
            c.put_namespace(&namespace()).unwrap();
            c.put_region(RegionRecord {
                region: 4,
                generation: 11,
            })
            .unwrap();
            let blocks: Vec<_> = (0..n)
                .map(|i| BlockRecord {
                    ns: 1,
                    key: i.to_be_bytes().repeat(8),
                    parent: vec![7; 32],
                    tokens: (0..16).collect(),
                    sealed_tokens: vec![],
                    size: 4096,
                    checksum: u64::from(i),
                    disk: None,
                    hits: 0,
                })
                .collect();
            c.put_blocks(&blocks, true).unwrap();
            c.sync().unwrap();
        }
        drop(RocksCatalog::open(&dir).unwrap());
        assert!(!files(&dir, ".sst").is_empty());
        dir
    }

    fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .collect();
        v.sort();
        v
    }

    fn moved_aside(root: &Path) -> Vec<PathBuf> {
        files(root, "")
            .into_iter()
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                name.starts_with("catalog.damaged-")
            })
            .collect()
    }

    /// Damaged, so: an empty catalog in place, the damaged one kept next
    /// to it, private, and named in the report.
    fn assert_started_cold(root: &Path, c: &RocksCatalog, damage: Option<Damage>) -> PathBuf {
        let damage = damage.expect("damage reported");
        assert_eq!(moved_aside(root), vec![damage.moved_to.clone()]);
        let mode = std::fs::metadata(&damage.moved_to)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(damage.moved_to.join("CURRENT").exists());
        assert!(!damage.reason.is_empty());
        assert!(c.namespaces().unwrap().is_empty());
        assert!(c.regions().unwrap().is_empty());
        let mut n = 0;
        c.scan_blocks(&mut |_| n += 1, &mut |_| {}).unwrap();
        assert_eq!(n, 0);
        damage.moved_to
    }

    #[test]
    fn truncated_manifest_starts_cold_and_keeps_the_files() {
        let root = tempfile::tempdir().unwrap();
        let dir = seeded(root.path(), 100);
        let tables = files(&dir, ".sst");
        let manifest = files(&dir, "").into_iter().find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("MANIFEST-")
        });
        let manifest = manifest.unwrap();
        let len = std::fs::metadata(&manifest).unwrap().len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&manifest)
            .unwrap();
        f.set_len(len / 2).unwrap();
        drop(f);

        // RocksDB alone opens this without an error, minus the table files
        // the lost edits named (and deletes them); kvbm must notice first.
        let (c, damage) = RocksCatalog::open_or_start_cold(&dir).unwrap();
        let reason = damage.as_ref().unwrap().reason.clone();
        assert!(reason.contains("truncated"), "{reason}");
        let kept = assert_started_cold(root.path(), &c, damage);
        let name = manifest.file_name().unwrap();
        assert_eq!(std::fs::metadata(kept.join(name)).unwrap().len(), len / 2);
        for t in tables {
            assert!(kept.join(t.file_name().unwrap()).exists(), "{t:?} kept");
        }
    }

    #[test]
    fn corrupt_current_starts_cold_and_keeps_the_files() {
        let root = tempfile::tempdir().unwrap();
        let dir = seeded(root.path(), 10);
        std::fs::write(dir.join("CURRENT"), b"\x00\xffgarbage\n").unwrap();
        let (c, damage) = RocksCatalog::open_or_start_cold(&dir).unwrap();
        let kept = assert_started_cold(root.path(), &c, damage);
        assert_eq!(
            std::fs::read(kept.join("CURRENT")).unwrap(),
            b"\x00\xffgarbage\n"
        );
    }

    #[test]
    fn missing_current_starts_cold() {
        let root = tempfile::tempdir().unwrap();
        let dir = seeded(root.path(), 10);
        std::fs::remove_file(dir.join("CURRENT")).unwrap();
        let (_c, damage) = RocksCatalog::open_or_start_cold(&dir).unwrap();
        let reason = damage.as_ref().unwrap().reason.clone();
        assert!(reason.contains("CURRENT is missing"), "{reason}");
        let damage = damage.unwrap();
        assert_eq!(moved_aside(root.path()), vec![damage.moved_to.clone()]);
        // Nothing was created over the old files.
        assert!(!damage.moved_to.join("CURRENT").exists());
        assert!(!files(&damage.moved_to, ".sst").is_empty());
    }

    #[test]
    fn garbage_over_a_table_file_starts_cold_and_keeps_the_files() {
        let root = tempfile::tempdir().unwrap();
        let dir = seeded(root.path(), 10);
        let table = files(&dir, ".sst").remove(0);
        let len = std::fs::metadata(&table).unwrap().len() as usize;
        std::fs::write(&table, vec![0xab; len]).unwrap();
        let (c, damage) = RocksCatalog::open_or_start_cold(&dir).unwrap();
        let kept = assert_started_cold(root.path(), &c, damage);
        let name = table.file_name().unwrap();
        assert_eq!(std::fs::read(kept.join(name)).unwrap(), vec![0xab; len]);
    }

    #[test]
    fn corrupt_record_block_found_by_the_scan_starts_cold() {
        let root = tempfile::tempdir().unwrap();
        // Enough records for many data blocks: RocksDB opens the table
        // (footer and index intact) and only reading the records fails.
        let dir = seeded(root.path(), 4000);
        let table = files(&dir, ".sst")
            .into_iter()
            .max_by_key(|p| std::fs::metadata(p).unwrap().len())
            .unwrap();
        let mut bytes = std::fs::read(&table).unwrap();
        assert!(bytes.len() > 64 << 10);
        bytes[4096..4160].fill(0x5a);
        std::fs::write(&table, bytes).unwrap();
        let (c, damage) = RocksCatalog::open_or_start_cold(&dir).unwrap();
        let reason = damage.as_ref().unwrap().reason.clone();
        assert!(reason.contains("Corruption"), "{reason}");
        assert_started_cold(root.path(), &c, damage);
    }

    #[test]
    fn healthy_catalog_reopens_warm() {
        let root = tempfile::tempdir().unwrap();
        let dir = seeded(root.path(), 10);
        for _ in 0..2 {
            let (c, damage) = RocksCatalog::open_or_start_cold(&dir).unwrap();
            assert_eq!(damage, None);
            assert_eq!(c.namespaces().unwrap(), vec![namespace()]);
            assert_eq!(c.regions().unwrap().len(), 1);
            let mut n = 0;
            c.scan_blocks(&mut |_| n += 1, &mut |_| {}).unwrap();
            assert_eq!(n, 10);
        }
        assert!(moved_aside(root.path()).is_empty());
    }

    #[test]
    fn locked_catalog_is_an_error_and_stays() {
        let root = tempfile::tempdir().unwrap();
        let dir = seeded(root.path(), 10);
        {
            let held = RocksCatalog::open(&dir).unwrap();
            let e = RocksCatalog::open_or_start_cold(&dir).err().unwrap();
            assert!(e.to_string().contains("already open"), "{e}");
            assert_eq!(held.namespaces().unwrap(), vec![namespace()]);
        }
        // Held through RocksDB's LOCK alone, as another daemon holds it.
        let cfs = [CF_BLOCKS, CF_NAMESPACES, CF_REGIONS, CF_REMOTE];
        let held = DB::open_cf(&Options::default(), &dir, cfs).unwrap();
        let e = RocksCatalog::open_or_start_cold(&dir).err().unwrap();
        assert!(e.to_string().contains("LOCK"), "{e}");
        drop(held);
        assert!(moved_aside(root.path()).is_empty());
        let (c, damage) = RocksCatalog::open_or_start_cold(&dir).unwrap();
        assert_eq!(damage, None);
        assert_eq!(c.namespaces().unwrap(), vec![namespace()]);
    }
}
