//! `kvtier bench remote`: the object-store tier (G4) against a plain
//! `object_store` PUT/GET loop on the same server, in the same run.
//!
//! - **Write.** The blocks go into a daemon (G4 on, `admit` 1, no disk tier)
//!   through its pool, as an engine offloads them; the clock stops when the
//!   daemon's Remote stats line counts every block (`blocks` counts a
//!   segment's blocks once its segment and index object are both in the
//!   bucket, so that is the moment every upload is done). The plain loop
//!   PUTs each block as its own object, [`UPLOADS`] in flight.
//! - **Read.** A second daemon on the same bucket (its own data directory:
//!   nothing local) waits until discovery lists every block, then acquires
//!   the chain `--chain` blocks per Acquire: each Acquire promotes its chain
//!   from G4 into the host pool. The plain loop GETs each object, [`READS`]
//!   in flight, in the same chains (one chain's GETs finish before the next
//!   chain's start, as one Acquire ends before the next begins).
//! - **Lookup.** A Lookup never touches the network: the fast-path (pool
//!   socket) p50 of a chain with G4 on, against a daemon without G4 holding
//!   the same keys.
//! - **Diagnostics** (after the timed part): the segment objects whole
//!   through the plain GET loop, and their blocks through the tier's own
//!   reads without the store, to tell the server, the tier and the store
//!   apart.
//!
//! Both sides use one client configuration (kvbm's [`Bucket::open`]: its
//! timeouts and retries), the same bucket under a fresh prefix per run, and
//! the baseline gets zero-copy slices of the source buffer. Everything the
//! run wrote is deleted at the end (best effort). Bytes read back are
//! checked against those written, outside the timing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::Args;
use futures::{StreamExt, TryStreamExt};
use kvbm::config::{RemoteConfig, Size};
use kvbm::remote::bucket::Bucket;
use kvbm::remote::tier::{READS, UPLOADS};
use kvtier_client::{v1, Client, Pool, Session};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::{fill, gbps, get_all, key, put_all, Daemon};

#[derive(Args, Clone)]
pub struct RemoteArgs {
    /// The bucket, s3://BUCKET/PREFIX (endpoint, region and credentials
    /// from AWS_*); the run writes under a fresh PREFIX/kvtier-bench-PID-MS
    /// and deletes it at the end.
    #[arg(long)]
    remote_url: String,
    /// Total data moved each way.
    #[arg(long, default_value = "1GiB")]
    bytes: Size,
    /// Block size.
    #[arg(long, default_value = "2MiB")]
    block_bytes: Size,
    /// Blocks per Reserve/Commit on the write side.
    #[arg(long, default_value_t = 32)]
    batch: u32,
    /// Blocks per Acquire on the read side (each one G4 promotion).
    #[arg(long, default_value_t = 512)]
    chain: u32,
    /// The G4 tier's deadlines: each request gets this fixed timeout (the
    /// HTTP client's is four times it) plus its bytes at
    /// --min-bytes-per-s [default: the tier's, 2000]. Change them only for
    /// a server too slow to meet the defaults; both sides get them.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// See --timeout-ms [default: the tier's, 50MB].
    #[arg(long)]
    min_bytes_per_s: Option<Size>,
    /// Directory for the daemons' scratch data.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Print one JSON line.
    #[arg(long)]
    json: bool,
}

/// Blocks per Reserve/Commit of the lookup baseline, and per Acquire of
/// the check.
const PUT_BATCH: usize = 32;
/// Lookups timed (after as many warm-up calls as a tenth of these).
const LOOKUPS: usize = 2000;

/// How long a phase moving `bytes` may take before the bench gives up: a
/// minute, plus the bytes at 2 MB/s (far below any server worth measuring).
fn limit(bytes: u64) -> Duration {
    Duration::from_secs(60) + Duration::from_secs(bytes / 2_000_000)
}

/// The daemons of a run, held here so that a failure still stops them
/// before the bucket is cleaned.
#[derive(Default)]
struct Live {
    writer: Option<Daemon>,
    reader: Option<Daemon>,
    plain: Option<Daemon>,
}

impl Live {
    async fn stop(&mut self) {
        for d in [self.writer.take(), self.reader.take(), self.plain.take()]
            .into_iter()
            .flatten()
        {
            let _ = d.stop().await;
        }
    }
}

/// What one run measured.
#[derive(Default)]
struct Figures {
    plain_write: Duration,
    plain_chains: Vec<Duration>,
    g4_put: Duration,
    g4_write: Duration,
    g4_segments: u64,
    g4_bytes: u64,
    /// A diagnostic: plain GETs of the G4 segment objects themselves,
    /// [`READS`] in flight, and their bytes.
    segments_plain_read: Duration,
    segments_bytes: u64,
    /// A diagnostic: the same segments' blocks through `Bucket::read_blocks`
    /// (ranged, verified), without the store.
    tier_read: Duration,
    discovery: Duration,
    g4_chains: Vec<Duration>,
    lookup_keys: usize,
    /// Fast-path lookup p50 / p99 (µs): chain only in G4; chain in host
    /// memory with G4 on; the same without G4.
    lookup_g4_only: (f64, f64),
    lookup_host_g4_on: (f64, f64),
    lookup_host_g4_off: (f64, f64),
}

pub async fn run(a: RemoteArgs) -> anyhow::Result<()> {
    let base = a.remote_url.trim_end_matches('/');
    if !base.starts_with("s3://") || base.len() <= "s3://".len() {
        bail!(
            "--remote-url must be s3://BUCKET/PREFIX, got {:?}",
            a.remote_url
        );
    }
    let block = a.block_bytes.0 as usize;
    if block == 0 {
        bail!("--block-bytes must be positive");
    }
    let n = (a.bytes.0 as usize / block).max(1);
    let chain = (a.chain.max(1) as usize).min(n);
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let run_url = format!("{base}/kvtier-bench-{}-{ms}", std::process::id());
    std::fs::create_dir_all(&a.dir)?;

    let mut src = vec![0u8; n * block];
    fill(&mut src, 4);
    let src = Bytes::from(src);

    let run = Run {
        a: &a,
        url: run_url.clone(),
        src: &src,
        block,
        n,
        chain,
    };
    let mut live = Live::default();
    let measured = measure(&run, &mut live).await;
    live.stop().await;
    let cleaned = cleanup(&a, &run_url).await;
    if let Err(e) = &cleaned {
        eprintln!("kvtier bench remote: cleaning {run_url} failed: {e:#}");
    }
    let f = measured?;

    let total = src.len() as u64;
    let median = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() / 2]
    };
    let plain_read: Duration = f.plain_chains.iter().sum();
    let g4_read: Duration = f.g4_chains.iter().sum();
    let (w_plain, w_g4) = (gbps(total, f.plain_write), gbps(total, f.g4_write));
    let (r_plain, r_g4) = (gbps(total, plain_read), gbps(total, g4_read));
    let (c_plain, c_g4) = (median(&f.plain_chains), median(&f.g4_chains));
    let chain_ratio = c_g4.as_secs_f64() / c_plain.as_secs_f64();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (rate, timeout) = {
        let r = remote_config(&a, base, total);
        (r.min_bytes_per_s, r.timeout)
    };
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "write_g4_gbps": w_g4, "write_plain_gbps": w_plain, "write_ratio": w_g4 / w_plain,
                "read_g4_gbps": r_g4, "read_plain_gbps": r_plain, "read_ratio": r_g4 / r_plain,
                "chain_blocks": chain, "chains": f.g4_chains.len(),
                "chain_g4_ms": ms(c_g4), "chain_plain_ms": ms(c_plain),
                "chain_time_ratio": chain_ratio,
                "g4_put_ms": ms(f.g4_put), "g4_segments": f.g4_segments,
                "g4_bucket_bytes": f.g4_bytes, "discovery_ms": ms(f.discovery),
                "segments_plain_get_gbps": gbps(f.segments_bytes, f.segments_plain_read),
                "tier_read_blocks_gbps": gbps(total, f.tier_read),
                "lookup_keys": f.lookup_keys,
                "lookup_g4_only_p50_us": f.lookup_g4_only.0,
                "lookup_g4_only_p99_us": f.lookup_g4_only.1,
                "lookup_host_g4_on_p50_us": f.lookup_host_g4_on.0,
                "lookup_host_g4_on_p99_us": f.lookup_host_g4_on.1,
                "lookup_host_g4_off_p50_us": f.lookup_host_g4_off.0,
                "lookup_host_g4_off_p99_us": f.lookup_host_g4_off.1,
                "block_bytes": block, "blocks": n, "batch": a.batch, "uploads": UPLOADS, "reads": READS,
                "min_bytes_per_s": rate, "timeout_ms": ms(timeout),
                "cleaned": cleaned.is_ok(),
            })
        );
    } else {
        println!(
            "G4 object store, {n} blocks of {block} bytes, {} per commit; {UPLOADS} uploads, \
             {READS} reads in flight; deadlines {:.0} ms + bytes at {rate} B/s",
            a.batch,
            ms(timeout)
        );
        println!(
            "  write  G4 {w_g4:6.3} GB/s   plain PUT loop {w_plain:6.3} GB/s   ratio {:.2}",
            w_g4 / w_plain
        );
        println!(
            "         (pool puts done after {:.0} ms; {} segments, {} bytes in the bucket)",
            ms(f.g4_put),
            f.g4_segments,
            f.g4_bytes
        );
        println!(
            "  read   G4 {r_g4:6.3} GB/s   plain GET loop {r_plain:6.3} GB/s   ratio {:.2}",
            r_g4 / r_plain
        );
        println!(
            "  chain of {chain} blocks (median of {}): G4 → host {:.0} ms   plain {:.0} ms   \
             time ratio {chain_ratio:.2}",
            f.g4_chains.len(),
            ms(c_g4),
            ms(c_plain)
        );
        println!(
            "         (the {} segment objects through the plain GET loop: {:.3} GB/s; \
             their blocks through the tier's reads alone, no store: {:.3} GB/s)",
            f.g4_segments,
            gbps(f.segments_bytes, f.segments_plain_read),
            gbps(total, f.tier_read)
        );
        println!(
            "  discovery on the second daemon: {:.0} ms",
            ms(f.discovery)
        );
        let l = |(p50, p99): (f64, f64)| format!("p50 {p50:.1} µs  p99 {p99:.1} µs");
        println!("  lookup {} keys (pool socket fast path):", f.lookup_keys);
        println!("    chain only in G4           {}", l(f.lookup_g4_only));
        println!("    chain in host, G4 on       {}", l(f.lookup_host_g4_on));
        println!("    chain in host, no G4       {}", l(f.lookup_host_g4_off));
    }
    Ok(())
}

/// `url`'s bucket client: kvbm's, with the settings the daemons get, so
/// both sides of the comparison share HTTP timeouts and retries.
fn open(a: &RemoteArgs, url: &str) -> anyhow::Result<Bucket> {
    Bucket::open(remote_config(a, url, 0)).with_context(|| format!("opening {url}"))
}

/// The G4 configuration of both daemons: uploads every committed block;
/// the upload queue holds the whole run, so a quick writer never has
/// blocks dropped (a drop fails the bench).
fn remote_config(a: &RemoteArgs, url: &str, total: u64) -> RemoteConfig {
    let mut r = RemoteConfig::new(url);
    r.admit = 1;
    if let Some(rate) = a.min_bytes_per_s {
        r.min_bytes_per_s = rate.0.max(1);
    }
    if let Some(ms) = a.timeout_ms {
        r.timeout = Duration::from_millis(ms.max(1));
    }
    r.queue_bytes = r.queue_bytes.max(total + r.segment_bytes);
    r.bytes = r.bytes.max(2 * total);
    r
}

/// One run's inputs.
struct Run<'r> {
    a: &'r RemoteArgs,
    /// `s3://BUCKET/PREFIX/kvtier-bench-PID-MS`: everything the run writes.
    url: String,
    src: &'r Bytes,
    block: usize,
    n: usize,
    chain: usize,
}

impl Run<'_> {
    fn total(&self) -> u64 {
        self.src.len() as u64
    }

    fn block_of(&self, i: usize) -> &[u8] {
        &self.src[i * self.block..(i + 1) * self.block]
    }

    /// `[start, end)` of each chain.
    fn chains(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.n)
            .step_by(self.chain)
            .map(|s| (s, (s + self.chain).min(self.n)))
    }

    fn scratch(&self, name: &str) -> PathBuf {
        self.a
            .dir
            .join(format!("kvtier-bench-{}-{name}", std::process::id()))
    }

    fn g4_url(&self) -> String {
        format!("{}/g4", self.url)
    }

    /// A daemon with G4 on, no disk tier, and room for every block.
    async fn g4_daemon(&self, name: &str) -> anyhow::Result<Daemon> {
        let host_bytes = self.total() + self.total() / 4 + (64 << 20);
        let mut cfg = Daemon::config(self.scratch(name), host_bytes, 0);
        cfg.remote = Some(remote_config(self.a, &self.g4_url(), self.total()));
        Daemon::start_with(cfg).await
    }
}

async fn measure(r: &Run<'_>, live: &mut Live) -> anyhow::Result<Figures> {
    let mut f = Figures::default();
    let plain = open(r.a, &format!("{}/plain", r.url))?;
    plain_loop(r, &plain, &mut f).await?;
    g4_write(r, live, &mut f).await?;
    let segments = list_segments(r.a, &r.g4_url()).await?;
    f.g4_segments = segments.len() as u64;
    lookup_baseline(r, live, &mut f).await?;
    g4_read(r, live, &mut f).await?;
    diagnostics(r, plain.store(), &segments, &mut f).await?;
    Ok(f)
}

/// The baseline: each block its own object, PUT with [`UPLOADS`] in
/// flight, then GET with [`READS`] in flight chain by chain; then checked.
async fn plain_loop(r: &Run<'_>, plain: &Bucket, f: &mut Figures) -> anyhow::Result<()> {
    let paths: Vec<Path> = (0..r.n)
        .map(|i| plain.path(&format!("block-{i:08}")))
        .collect();
    let store = plain.store();
    f.plain_write = within(limit(r.total()), "the plain PUT loop", async {
        let t = Instant::now();
        let mut puts = futures::stream::iter(0..r.n)
            .map(|i| {
                let payload = PutPayload::from(r.src.slice(i * r.block..(i + 1) * r.block));
                store.put(&paths[i], payload)
            })
            .buffer_unordered(UPLOADS);
        while let Some(put) = puts.next().await {
            put.context("plain PUT")?;
        }
        Ok(t.elapsed())
    })
    .await?;
    let mut back: Vec<Option<Bytes>> = vec![None; r.n];
    let paths = &paths;
    for (start, end) in r.chains() {
        let bytes = ((end - start) * r.block) as u64;
        let (t, got) = within(limit(bytes), "a plain GET chain", async {
            let t = Instant::now();
            let got: Vec<(usize, Bytes)> = futures::stream::iter(start..end)
                .map(|i| async move { anyhow::Ok((i, store.get(&paths[i]).await?.bytes().await?)) })
                .buffer_unordered(READS)
                .try_collect()
                .await
                .context("plain GET")?;
            Ok((t.elapsed(), got))
        })
        .await?;
        f.plain_chains.push(t);
        for (i, b) in got {
            back[i] = Some(b);
        }
    }
    for (i, b) in back.iter().enumerate() {
        if b.as_deref() != Some(r.block_of(i)) {
            bail!("plain GET of block {i} returned other bytes than its PUT wrote");
        }
    }
    Ok(())
}

/// G4 write: the blocks go in through the pool; the clock stops when the
/// Remote stats line counts them all in the bucket.
async fn g4_write(r: &Run<'_>, live: &mut Live, f: &mut Figures) -> anyhow::Result<()> {
    let w = live.writer.insert(r.g4_daemon("g4w").await?);
    let pool = attach(w).await?;
    w.client.register_namespace("bench", r.block as u64).await?;
    let t = Instant::now();
    within(
        limit(r.total()),
        "putting the blocks through the pool",
        async {
            let batch = r.a.batch.max(1) as usize;
            put_all(&w.client, &pool, "bench", r.src, r.block, batch).await
        },
    )
    .await?;
    f.g4_put = t.elapsed();
    let line = wait_remote(
        &w.client,
        r.n as u64,
        Duration::from_millis(5),
        limit(r.total()),
        "the writer's uploads",
    )
    .await?;
    f.g4_write = t.elapsed();
    f.g4_bytes = line.used_bytes;
    drop(pool);
    if let Some(d) = live.writer.take() {
        d.stop().await?;
    }
    Ok(())
}

/// The lookups' baseline: a daemon without G4 holding the same keys in
/// host memory (4 KiB blocks: a lookup's cost does not depend on their
/// size).
async fn lookup_baseline(r: &Run<'_>, live: &mut Live, f: &mut Figures) -> anyhow::Result<()> {
    f.lookup_keys = r.chain.min(512);
    let cfg = Daemon::config(r.scratch("nog4"), 64 << 20, 0);
    let c = live.plain.insert(Daemon::start_with(cfg).await?);
    let pool = attach(c).await?;
    c.client.register_namespace("bench", 4096).await?;
    let blocks = vec![7u8; f.lookup_keys * 4096];
    within(limit(0), "putting the lookup baseline's blocks", async {
        put_all(&c.client, &pool, "bench", &blocks, 4096, PUT_BATCH).await
    })
    .await?;
    drop(pool);
    f.lookup_host_g4_off = lookups(&c.socket, f.lookup_keys).await?;
    if let Some(d) = live.plain.take() {
        d.stop().await?;
    }
    Ok(())
}

/// G4 read: a second daemon on the same bucket (nothing local) learns the
/// blocks by discovery, then acquires them chain by chain, each Acquire one
/// promotion from G4 into its host pool; then the bytes are checked.
async fn g4_read(r: &Run<'_>, live: &mut Live, f: &mut Figures) -> anyhow::Result<()> {
    let rd = live.reader.insert(r.g4_daemon("g4r").await?);
    let t = Instant::now();
    wait_remote(
        &rd.client,
        r.n as u64,
        Duration::from_millis(50),
        limit(0),
        "the second daemon's discovery",
    )
    .await?;
    f.discovery = t.elapsed();
    let pool = attach(rd).await?;
    rd.client
        .register_namespace("bench", r.block as u64)
        .await?;
    f.lookup_g4_only = lookups(&rd.socket, f.lookup_keys).await?;
    let mut rpc = rd.client.rpc();
    for (start, end) in r.chains() {
        let bytes = ((end - start) * r.block) as u64;
        let t = Instant::now();
        let got = within(limit(bytes), "acquiring a chain from G4", async {
            Ok(rpc
                .acquire(v1::AcquireRequest {
                    session: pool.session(),
                    namespace: "bench".into(),
                    keys: (start..end).map(key).collect(),
                })
                .await?
                .into_inner())
        })
        .await?;
        f.g4_chains.push(t.elapsed());
        rpc.release(v1::ReleaseRequest {
            session: pool.session(),
            lease: got.lease,
        })
        .await?;
        if got.slots.len() != end - start {
            let line = remote_line(&rd.client).await?;
            bail!(
                "acquiring blocks {start}..{end} from G4 gave {} of {} (G4 hits {}, misses {}, \
                 degraded: {})",
                got.slots.len(),
                end - start,
                line.hits,
                line.misses,
                line.degraded
            );
        }
    }
    let line = remote_line(&rd.client).await?;
    if line.hits < r.n as u64 {
        bail!(
            "the reader counted {} G4 hits for {} blocks",
            line.hits,
            r.n
        );
    }
    f.lookup_host_g4_on = lookups(&rd.socket, f.lookup_keys).await?;
    // Check (outside the timing): the blocks are in host memory now.
    let mut back = vec![0u8; r.src.len()];
    within(
        limit(r.total()),
        "reading the promoted blocks back",
        async {
            get_all(
                &rd.client,
                &pool,
                "bench",
                Some(&mut back),
                r.n,
                r.block,
                PUT_BATCH,
            )
            .await
        },
    )
    .await?;
    if let Some(i) = (0..r.n).find(|&i| back[i * r.block..(i + 1) * r.block] != *r.block_of(i)) {
        bail!("blocks promoted from G4 differ from those written (first: block {i})");
    }
    drop(pool);
    if let Some(d) = live.reader.take() {
        d.stop().await?;
    }
    Ok(())
}

/// Diagnostics, after the timed reads: the segment objects whole through
/// the plain GET loop, and their blocks through the tier's own reads
/// (`Bucket::read_blocks`: one ranged read per segment, verified, as a
/// promotion reads them) without the store; [`READS`] in flight each.
async fn diagnostics(
    r: &Run<'_>,
    store: &Arc<dyn ObjectStore>,
    segments: &[Path],
    f: &mut Figures,
) -> anyhow::Result<()> {
    let (t, bytes) = within(limit(r.total()), "the plain GETs of the segments", async {
        let t = Instant::now();
        let sizes: Vec<usize> = futures::stream::iter(segments)
            .map(|p| async move { anyhow::Ok(store.get(p).await?.bytes().await?.len()) })
            .buffer_unordered(READS)
            .try_collect()
            .await
            .context("plain GET of a segment")?;
        Ok((t.elapsed(), sizes.iter().sum::<usize>() as u64))
    })
    .await?;
    f.segments_plain_read = t;
    f.segments_bytes = bytes;

    let g4 = open(r.a, &r.g4_url())?;
    let prefix = g4.path("");
    let names: Vec<String> = segments
        .iter()
        .filter_map(|p| p.prefix_match(&prefix))
        .map(|parts| {
            parts
                .map(|p| p.as_ref().to_owned())
                .collect::<Vec<_>>()
                .join("/")
        })
        .collect();
    let mut footers = Vec::with_capacity(names.len());
    for name in &names {
        let footer = within(limit(0), "reading a segment's footer", async {
            g4.read_footer(name)
                .await
                .map_err(|e| anyhow!("footer of {name}: {e}"))
        })
        .await?;
        footers.push(footer);
    }
    let (t, blocks) = within(limit(r.total()), "the tier's segment reads", async {
        let t = Instant::now();
        let counts: Vec<usize> = futures::stream::iter(names.iter().zip(&footers))
            .map(|(name, footer)| {
                let g4 = &g4;
                async move {
                    let which: Vec<usize> = (0..footer.blocks.len()).collect();
                    let got = g4
                        .read_blocks(name, footer, &which)
                        .await
                        .map_err(|e| anyhow!("blocks of {name}: {e}"))?;
                    anyhow::Ok(got.iter().flatten().count())
                }
            })
            .buffered(READS)
            .try_collect()
            .await?;
        Ok((t.elapsed(), counts.iter().sum::<usize>()))
    })
    .await?;
    if blocks != r.n {
        bail!(
            "the tier's segment reads verified {blocks} of {} blocks",
            r.n
        );
    }
    f.tier_read = t;
    Ok(())
}

/// Runs `fut` under `limit`, failing with what it was.
async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| anyhow!("{what} took longer than {limit:?}"))?
}

async fn attach(d: &Daemon) -> anyhow::Result<Pool> {
    let socket = d.socket.clone();
    Ok(tokio::task::spawn_blocking(move || Pool::attach(&socket)).await??)
}

/// The daemon's Remote stats line.
async fn remote_line(c: &Client) -> anyhow::Result<v1::TierStats> {
    c.stats()
        .await?
        .tiers
        .into_iter()
        .find(|t| t.tier == v1::Tier::Remote as i32)
        .ok_or_else(|| anyhow!("the daemon's stats have no Remote line (G4 off?)"))
}

/// Polls the Remote stats line every `every` until it counts `n` blocks;
/// fails on a dropped upload, an open breaker held past the limit, or the
/// limit.
async fn wait_remote(
    c: &Client,
    n: u64,
    every: Duration,
    limit: Duration,
    what: &str,
) -> anyhow::Result<v1::TierStats> {
    let until = Instant::now() + limit;
    loop {
        let r = remote_line(c).await?;
        if r.dropped_writes > 0 {
            // The queue holds the whole run: these uploads failed.
            bail!(
                "{what}: {} blocks dropped by failed uploads (a deadline missed, or the \
                 server refused them; see --min-bytes-per-s); {} of {n} blocks in G4 \
                 (degraded: {})",
                r.dropped_writes,
                r.blocks,
                r.degraded
            );
        }
        if r.blocks >= n {
            return Ok(r);
        }
        if Instant::now() >= until {
            bail!(
                "{what}: {} of {n} blocks in G4 after {limit:?} (degraded: {})",
                r.blocks,
                r.degraded
            );
        }
        tokio::time::sleep(every).await;
    }
}

/// Lookup p50 and p99 (µs) of blocks `0..keys` over the pool socket's fast
/// path, the one engines' schedulers use.
async fn lookups(socket: &std::path::Path, keys: usize) -> anyhow::Result<(f64, f64)> {
    let socket = socket.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut s = Session::connect(&socket, Some(Duration::from_secs(5)))?;
        let chain: Vec<Vec<u8>> = (0..keys).map(key).collect();
        let mut lat = Vec::with_capacity(LOOKUPS);
        for i in 0..LOOKUPS + LOOKUPS / 10 {
            let t = Instant::now();
            let r = s.lookup("bench", chain.iter().map(|k| k.as_slice()))?;
            if i >= LOOKUPS / 10 {
                lat.push(t.elapsed());
            }
            if r.matched as usize != keys {
                bail!("lookup matched {} of {keys} keys", r.matched);
            }
        }
        lat.sort();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        Ok((us(lat[lat.len() / 2]), us(lat[lat.len() * 99 / 100])))
    })
    .await?
}

/// Every object under `url`'s prefix.
async fn list(a: &RemoteArgs, url: &str) -> anyhow::Result<(Arc<dyn ObjectStore>, Vec<Path>)> {
    let b = open(a, url)?;
    let store = b.store().clone();
    let prefix = b.path("");
    let found = within(limit(0), "listing the bench's objects", async {
        Ok(store
            .list(Some(&prefix))
            .map_ok(|m| m.location)
            .try_collect()
            .await?)
    })
    .await?;
    Ok((store, found))
}

/// The segments under the G4 prefix.
async fn list_segments(a: &RemoteArgs, url: &str) -> anyhow::Result<Vec<Path>> {
    let (_, mut all) = list(a, url).await?;
    all.retain(|p| p.as_ref().ends_with(".kvs"));
    Ok(all)
}

/// Deletes everything under the run's prefix; fails when something is left.
async fn cleanup(a: &RemoteArgs, url: &str) -> anyhow::Result<()> {
    let (store, all) = list(a, url).await?;
    within(limit(0), "deleting the bench's objects", async {
        futures::stream::iter(all)
            .map(|p| {
                let store = store.clone();
                async move { store.delete(&p).await }
            })
            .buffer_unordered(16)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    })
    .await?;
    let (_, left) = list(a, url).await?;
    if !left.is_empty() {
        bail!("{} objects left under {url}", left.len());
    }
    Ok(())
}
