//! `kvtier bench host|disk|remote`: the daemon's data paths against a plain
//! baseline measured in the same run, on the same machine and file system
//! (and, for `remote`, the same object-store server).
//!
//! Each bench starts a kvbm daemon in-process with a scratch data directory
//! under the current directory (removed afterwards) and talks to it through
//! its real Unix socket and pool socket, as a local connector would.

#[path = "bench_remote.rs"]
mod remote;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use kvbm::config::{Config, Size};
use kvtier_client::{v1, Client, Pool};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// G2: zero-copy put/get through the pool against plain memcpy.
    Host(BenchArgs),
    /// G3: write-behind and reads through the daemon against a plain
    /// io_uring O_DIRECT loop at the same block size and queue depth.
    Disk(BenchArgs),
    /// G4: write-behind to an S3 bucket and chain promotions from it
    /// against a plain object_store PUT/GET loop on the same server.
    Remote(remote::RemoteArgs),
}

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Total data moved each way.
    #[arg(long, default_value = "1GiB")]
    bytes: Size,
    /// Block size.
    #[arg(long, default_value = "2MiB")]
    block_bytes: Size,
    /// Blocks per request (host) / I/O queue depth (disk).
    #[arg(long, default_value_t = 32)]
    batch: u32,
    /// Directory for the scratch data (its file system is the one measured).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Print one JSON line.
    #[arg(long)]
    json: bool,
}

pub async fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Host(a) => host(a).await,
        BenchCmd::Disk(a) => disk(a).await,
        BenchCmd::Remote(a) => remote::run(a).await,
    }
}

/// A daemon running in this process for the duration of a bench.
struct Daemon {
    dir: PathBuf,
    socket: PathBuf,
    client: Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<kvbm::Result<()>>,
    /// Gone once the store (and its catalog) is dropped.
    store: std::sync::Weak<kvbm::Store>,
}

impl Daemon {
    async fn start(a: &BenchArgs, host_bytes: u64, disk_bytes: u64) -> anyhow::Result<Daemon> {
        let dir = a.dir.join(format!("kvtier-bench-{}", std::process::id()));
        let mut cfg = Daemon::config(dir, host_bytes, disk_bytes);
        cfg.disk_queue_depth = a.batch;
        cfg.write_queue = cfg
            .write_queue
            .max(2 * (a.bytes.0 / a.block_bytes.0.max(1)) as usize);
        Daemon::start_with(cfg).await
    }

    /// A scratch daemon's configuration: everything under `dir`, no TCP
    /// listeners.
    fn config(dir: PathBuf, host_bytes: u64, disk_bytes: u64) -> Config {
        Config {
            socket: dir.join("kvbm.sock"),
            disk_path: dir.join("g3.dat"),
            data_dir: dir,
            host_bytes,
            disk_bytes,
            grpc: String::new(),
            http: String::new(),
            ..Config::default()
        }
    }

    /// Starts a daemon on `cfg` (its data directory is removed by
    /// [`Daemon::stop`]).
    async fn start_with(cfg: Config) -> anyhow::Result<Daemon> {
        let (dir, socket) = (cfg.data_dir.clone(), cfg.socket.clone());
        let (store, _, listeners) = kvbm::server::start(cfg)
            .await
            .with_context(|| format!("starting kvbm in {}", dir.display()))?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let weak = std::sync::Arc::downgrade(&store);
        let task = tokio::spawn(kvbm::server::serve(store, listeners, async move {
            let _ = rx.await;
        }));
        let client = Client::connect(&socket.display().to_string()).await?;
        Ok(Daemon {
            dir,
            socket,
            client,
            stop: Some(tx),
            task,
            store: weak,
        })
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
        // The store outlives `serve` briefly (threads of closing sessions,
        // the G4 tier's tasks), and its catalog writes files until it is
        // dropped: wait for that (a few seconds at most) before removing
        // the directory, and retry a removal that raced a late write.
        let until = Instant::now() + Duration::from_secs(5);
        while self.store.strong_count() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        while std::fs::remove_dir_all(&self.dir).is_err()
            && self.dir.exists()
            && Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// Deterministic, incompressible-looking block contents.
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in buf.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
}

fn key(i: usize) -> Vec<u8> {
    let mut k = b"bench-block-".to_vec();
    k.extend_from_slice(&(i as u64).to_be_bytes());
    k
}

fn meta(i: usize) -> v1::BlockMeta {
    v1::BlockMeta {
        key: key(i),
        parent: if i == 0 { vec![] } else { key(i - 1) },
        token_ids: vec![],
    }
}

/// Writes blocks `[0, n)` through Reserve / copy / Commit, `batch` at a time.
async fn put_all(
    client: &Client,
    pool: &Pool,
    ns: &str,
    src: &[u8],
    block: usize,
    batch: usize,
) -> anyhow::Result<()> {
    let n = src.len() / block;
    let mut rpc = client.rpc();
    for start in (0..n).step_by(batch) {
        let end = (start + batch).min(n);
        let slots = rpc
            .reserve(v1::ReserveRequest {
                session: pool.session(),
                namespace: ns.into(),
                blocks: (start..end).map(meta).collect(),
            })
            .await?
            .into_inner()
            .slots;
        for (i, s) in (start..end).zip(&slots) {
            let dst = pool
                .slot_mut(s.offset, s.length)
                .context("daemon granted a slot outside the pool")?;
            dst.copy_from_slice(&src[i * block..(i + 1) * block]);
        }
        rpc.commit(v1::CommitRequest {
            session: pool.session(),
            namespace: ns.into(),
            keys: (start..end).map(key).collect(),
        })
        .await?;
    }
    Ok(())
}

/// Reads blocks `[0, n)` through Acquire / copy / Release into `dst` (when
/// given), `batch` at a time.
async fn get_all(
    client: &Client,
    pool: &Pool,
    ns: &str,
    mut dst: Option<&mut [u8]>,
    n: usize,
    block: usize,
    batch: usize,
) -> anyhow::Result<()> {
    let mut rpc = client.rpc();
    for start in (0..n).step_by(batch) {
        let end = (start + batch).min(n);
        let r = rpc
            .acquire(v1::AcquireRequest {
                session: pool.session(),
                namespace: ns.into(),
                keys: (start..end).map(key).collect(),
            })
            .await?
            .into_inner();
        if r.slots.len() != end - start {
            bail!(
                "acquire returned {} of {} blocks",
                r.slots.len(),
                end - start
            );
        }
        if let Some(dst) = dst.as_deref_mut() {
            for (i, s) in (start..end).zip(&r.slots) {
                let src = pool
                    .slot(s.offset, s.length)
                    .context("daemon granted a slot outside the pool")?;
                dst[i * block..(i + 1) * block].copy_from_slice(src);
            }
        }
        rpc.release(v1::ReleaseRequest {
            session: pool.session(),
            lease: r.lease,
        })
        .await?;
    }
    Ok(())
}

async fn host(a: BenchArgs) -> anyhow::Result<()> {
    let block = a.block_bytes.0 as usize;
    let n = (a.bytes.0 as usize / block).max(1);
    let total = (n * block) as u64;
    let batch = a.batch.max(1) as usize;

    let mut src = vec![0u8; n * block];
    fill(&mut src, 1);
    let mut dst = vec![0u8; n * block];
    dst.fill(1); // fault the pages in before timing

    // Baseline: plain memcpy of the same blocks between two warm buffers.
    let t = Instant::now();
    for i in 0..n {
        dst[i * block..(i + 1) * block].copy_from_slice(&src[i * block..(i + 1) * block]);
    }
    let baseline = gbps(total, t.elapsed());
    dst.fill(0);

    let d = Daemon::start(&a, total + total / 4 + (64 << 20), 0).await?;
    let pool = {
        let socket = d.socket.clone();
        tokio::task::spawn_blocking(move || Pool::attach(&socket)).await??
    };
    d.client.register_namespace("bench", block as u64).await?;

    let t = Instant::now();
    put_all(&d.client, &pool, "bench", &src, block, batch).await?;
    let put = gbps(total, t.elapsed());

    let t = Instant::now();
    get_all(&d.client, &pool, "bench", Some(&mut dst), n, block, batch).await?;
    let get = gbps(total, t.elapsed());
    if src != dst {
        bail!("blocks read back differ from those written");
    }

    // Lookup latency of a 512-key chain over the Unix socket.
    let chain: Vec<Vec<u8>> = (0..512).map(key).collect();
    let mut lat = Vec::with_capacity(2000);
    for i in 0..2200 {
        let t = Instant::now();
        d.client.lookup("bench", chain.clone()).await?;
        if i >= 200 {
            lat.push(t.elapsed());
        }
    }
    lat.sort();
    let lookup_p50_us = lat[lat.len() / 2].as_secs_f64() * 1e6;
    let lookup_p99_us = lat[lat.len() * 99 / 100].as_secs_f64() * 1e6;

    // Index memory per block, measured on the daemon's own index type.
    let index_bytes_per_block = {
        let mut ix = kvbm::index::Index::new();
        let blocks = 1_000_000u32;
        for i in 0..blocks {
            let k = xxhash_key(i);
            ix.insert(1, k, kvbm::index::State::Ready, None);
        }
        ix.memory_bytes() as f64 / blocks as f64
    };
    drop(pool);
    d.stop().await?;

    let put_ratio = put / baseline;
    let get_ratio = get / baseline;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "put_gbps": put, "get_gbps": get, "baseline_gbps": baseline,
                "put_ratio": put_ratio, "get_ratio": get_ratio,
                "lookup_512_p50_us": lookup_p50_us, "lookup_512_p99_us": lookup_p99_us,
                "index_bytes_per_block": index_bytes_per_block,
                "block_bytes": block, "blocks": n, "batch": batch,
            })
        );
    } else {
        println!("G2 host pool, {n} blocks of {block} bytes, {batch} per request");
        println!("  memcpy baseline   {baseline:7.2} GB/s");
        println!("  put (zero-copy)   {put:7.2} GB/s   ratio {put_ratio:.2}");
        println!("  get (zero-copy)   {get:7.2} GB/s   ratio {get_ratio:.2}");
        println!("  lookup 512 keys   p50 {lookup_p50_us:.1} µs   p99 {lookup_p99_us:.1} µs");
        println!("  index memory      {index_bytes_per_block:.1} bytes/block (1M blocks)");
    }
    Ok(())
}

/// A 32-byte key like an engine's sha256 block hash.
fn xxhash_key(i: u32) -> kvbm::index::Key {
    let mut b = [0u8; 32];
    for (j, c) in b.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(
            &((i as u64) << 8 | j as u64)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .to_le_bytes(),
        );
    }
    // 32 bytes is always a valid key length.
    kvbm::index::Key::new(&b).unwrap_or_else(|| unreachable!())
}

async fn disk(a: BenchArgs) -> anyhow::Result<()> {
    let block = a.block_bytes.0 as usize;
    let n = (a.bytes.0 as usize / block).max(1);
    let total = (n * block) as u64;
    let qd = a.batch.max(1);
    std::fs::create_dir_all(&a.dir)?;

    // Baseline first: a plain io_uring O_DIRECT loop on the same directory.
    let base = {
        let dir = a.dir.clone();
        tokio::task::spawn_blocking(move || kvbm::bench_disk::baseline(&dir, block, n, qd))
            .await??
    };

    let region = 64u64 << 20;
    let disk_bytes = (total + total / 2).div_ceil(region) * region + 2 * region;
    let d = Daemon::start(&a, total + total / 4 + (64 << 20), disk_bytes).await?;
    let pool = {
        let socket = d.socket.clone();
        tokio::task::spawn_blocking(move || Pool::attach(&socket)).await??
    };
    d.client.register_namespace("bench", block as u64).await?;
    let mut src = vec![0u8; n * block];
    fill(&mut src, 2);

    // Write: blocks go in through the pool; write-behind puts them on disk;
    // the clock stops when Sync reports them durable.
    let t = Instant::now();
    put_all(&d.client, &pool, "bench", &src, block, qd as usize).await?;
    let durable = d.client.sync().await?;
    let write = gbps(total, t.elapsed());
    if durable < n as u64 {
        bail!("only {durable} of {n} blocks reached the disk (dropped writes?)");
    }

    // Read: drop the host copies, then acquire everything back from disk
    // into the pool, `qd` blocks per request.
    d.client
        .rpc()
        .clear(v1::ClearRequest {
            tier: v1::Tier::Host as i32,
            namespace: String::new(),
        })
        .await?;
    let t = Instant::now();
    get_all(&d.client, &pool, "bench", None, n, block, qd as usize).await?;
    let read = gbps(total, t.elapsed());
    // Verify what was read (outside the timing).
    let mut back = vec![0u8; n * block];
    get_all(
        &d.client,
        &pool,
        "bench",
        Some(&mut back),
        n,
        block,
        qd as usize,
    )
    .await?;
    if back != src {
        bail!("blocks read back from disk differ from those written");
    }
    drop(pool);
    d.stop().await?;

    let write_ratio = write / base.write_gbps;
    let read_ratio = read / base.read_gbps;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "write_gbps": write, "read_gbps": read,
                "baseline_write_gbps": base.write_gbps, "baseline_read_gbps": base.read_gbps,
                "write_ratio": write_ratio, "read_ratio": read_ratio,
                "block_bytes": block, "blocks": n, "queue_depth": qd,
            })
        );
    } else {
        println!(
            "G3 disk, {n} blocks of {block} bytes, queue depth {qd}, in {}",
            a.dir.display()
        );
        println!(
            "  write  kvbm {write:6.2} GB/s   plain io_uring {:6.2} GB/s   ratio {write_ratio:.2}",
            base.write_gbps
        );
        println!(
            "  read   kvbm {read:6.2} GB/s   plain io_uring {:6.2} GB/s   ratio {read_ratio:.2}",
            base.read_gbps
        );
    }
    Ok(())
}
