//! Benchmark support for `kvtier bench disk`: the baseline G3 is measured
//! against — a plain io_uring `O_DIRECT` loop over one file at the same block
//! size and queue depth — and the same workload through [`DiskTier`].
//!
//! Both sides are measured alike: the write phase includes the final
//! `fdatasync`; the file is preallocated, untimed, for both (the daemon's
//! steady state recycles regions that were allocated long ago); the read
//! phase reads every block once at the same queue depth. The baseline uses plain (unregistered) buffers, as a
//! straightforward application would.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use io_uring::{opcode, types, IoUring};

use crate::disk::{
    entry_bytes, Admission, AlignedBuf, DiskConfig, DiskError, DiskLocation, DiskTier, ReadDone,
    WriteDone, PAGE,
};

/// Throughput of one run, in GB/s (10^9 bytes per second) of block payload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BaselineResult {
    pub write_gbps: f64,
    pub read_gbps: f64,
}

/// Removes the benchmark file however the run ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn bench_path(dir: &Path, what: &str) -> PathBuf {
    dir.join(format!("kvtier-bench-{what}-{}.dat", std::process::id()))
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs.max(1e-9) / 1e9
}

fn fill_pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// The plain loop: writes `blocks` blocks of `block_bytes` (rounded up to
/// 4 KiB) from an aligned buffer to a fresh file in `dir` with `O_DIRECT` at
/// queue depth `queue_depth`, `fdatasync`s, reads them all back at the same
/// depth, and removes the file. Falls back to buffered I/O only where the
/// file system refuses `O_DIRECT` at open (as the tier does).
pub fn baseline(
    dir: &Path,
    block_bytes: usize,
    blocks: usize,
    queue_depth: u32,
) -> io::Result<BaselineResult> {
    baseline_with(dir, block_bytes, blocks, queue_depth, false)
}

/// [`baseline`], optionally with its buffers registered as io_uring fixed
/// buffers (`fixed`): the strongest plain loop, for judging the tier's
/// overhead where per-I/O page pinning is a noticeable cost.
pub fn baseline_with(
    dir: &Path,
    block_bytes: usize,
    blocks: usize,
    queue_depth: u32,
    fixed: bool,
) -> io::Result<BaselineResult> {
    let block = entry_round(block_bytes)?;
    let qd = queue_depth.max(1) as usize;
    let path = bench_path(dir, "baseline");
    let _rm = RemoveOnDrop(path.clone());
    let open = |flags: i32| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(flags)
            .open(&path)
    };
    let file = match open(libc::O_DIRECT) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open(0)?,
        r => r?,
    };
    let total = block as u64 * blocks as u64;
    // SAFETY: plain syscall on our own descriptor.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, total as libc::off_t) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(e);
        }
    }
    let mut src = alloc(block)?;
    fill_pattern(&mut src, 1);
    let mut dst: Vec<AlignedBuf> = (0..qd).map(|_| alloc(block)).collect::<io::Result<_>>()?;

    let src_ptr = src.as_mut_ptr();
    let ptrs: Vec<*mut u8> = dst.iter_mut().map(|b| b.as_mut_ptr()).collect();
    let t = Instant::now();
    // Writes all come from the same buffer; the device does not care.
    run_loop(&file, block, blocks, qd, &[src_ptr], true, fixed)?;
    // SAFETY: plain syscall on our own descriptor.
    if unsafe { libc::fdatasync(file.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let write_secs = t.elapsed().as_secs_f64();

    let t = Instant::now();
    run_loop(&file, block, blocks, qd, &ptrs, false, fixed)?;
    let read_secs = t.elapsed().as_secs_f64();
    Ok(BaselineResult {
        write_gbps: gbps(total, write_secs),
        read_gbps: gbps(total, read_secs),
    })
}

fn entry_round(block_bytes: usize) -> io::Result<usize> {
    let b = block_bytes.max(1).div_ceil(PAGE) * PAGE;
    if b > u32::MAX as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "block too large",
        ));
    }
    Ok(b)
}

fn alloc(len: usize) -> io::Result<AlignedBuf> {
    AlignedBuf::new(len).ok_or_else(|| io::ErrorKind::OutOfMemory.into())
}

/// Keeps `qd` block I/Os in flight until `blocks` completed. In-flight slot
/// `i` uses buffer `bufs[i % bufs.len()]` (each `block` bytes); with `fixed`
/// the buffers are registered and the fixed opcodes used.
fn run_loop(
    file: &File,
    block: usize,
    blocks: usize,
    qd: usize,
    bufs: &[*mut u8],
    write: bool,
    fixed: bool,
) -> io::Result<()> {
    let mut ring = IoUring::new((qd as u32).next_power_of_two())?;
    let fd = types::Fd(file.as_raw_fd());
    if bufs.is_empty() {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    if fixed {
        let iovs: Vec<libc::iovec> = bufs
            .iter()
            .map(|&p| libc::iovec {
                iov_base: p.cast(),
                iov_len: block,
            })
            .collect();
        // SAFETY: the buffers outlive the ring, which is dropped at the end
        // of this function.
        unsafe { ring.submitter().register_buffers(&iovs)? };
    }
    let buf = |slot: usize| bufs[slot % bufs.len()];
    let mut free: Vec<usize> = (0..qd).collect();
    let (mut next, mut done, mut inflight) = (0usize, 0usize, 0usize);
    while done < blocks {
        while inflight < qd && next < blocks {
            let Some(slot) = free.pop() else { break };
            let off = next as u64 * block as u64;
            let e = if write {
                opcode::Write::new(fd, buf(slot), block as u32)
                    .offset(off)
                    .build()
            } else {
                opcode::Read::new(fd, buf(slot), block as u32)
                    .offset(off)
                    .build()
            };
            // SAFETY: the buffers outlive the loop, which waits for every
            // completion before returning.
            if unsafe { ring.submission().push(&e.user_data(slot as u64)) }.is_err() {
                free.push(slot);
                break;
            }
            next += 1;
            inflight += 1;
        }
        ring.submit_and_wait(1)?;
        for c in ring.completion() {
            inflight -= 1;
            done += 1;
            free.push(c.user_data() as usize);
            if c.result() < 0 {
                return Err(io::Error::from_raw_os_error(-c.result()));
            }
            if c.result() as usize != block {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short I/O"));
            }
        }
    }
    Ok(())
}

/// The same workload through [`DiskTier`]: `blocks` writes of `block_bytes`
/// via `submit_write` at queue depth `queue_depth` (sources are a registered
/// pool of aligned buffers, as G2 slots would be) followed by `sync()`, then
/// every block read back and verified into registered buffers. Removes the
/// file afterwards.
pub fn disk_tier(
    dir: &Path,
    block_bytes: usize,
    blocks: usize,
    queue_depth: u32,
) -> Result<BaselineResult, DiskError> {
    let io_err = |e: io::Error| DiskError::Io(e, "benchmark setup".into());
    let path = bench_path(dir, "tier");
    let _ = std::fs::remove_file(&path);
    let _rm = RemoveOnDrop(path.clone());
    let region = DiskConfig::DEFAULT_REGION_BYTES.max(entry_bytes(block_bytes as u64));
    let need = entry_bytes(block_bytes as u64) * blocks as u64;
    let mut cfg = DiskConfig::new(path, need.div_ceil(region) * region + region);
    cfg.region_bytes = region;
    cfg.queue_depth = queue_depth.max(1);
    cfg.write_queue = blocks.max(1);
    cfg.admit = Admission::Always;
    // Preallocate the whole file untimed, as the baseline does: this is the
    // daemon's steady state, where regions are recycled, not allocated.
    {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&cfg.path)
            .map_err(io_err)?;
        // SAFETY: plain syscall on our own descriptor.
        if unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, cfg.capacity as libc::off_t) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(io_err(e));
            }
        }
    }
    let tier = DiskTier::open(cfg, [])?;

    // Twice the queue depth of buffers so completions and submissions
    // overlap; each buffer is used by one I/O at a time.
    let nbuf = 2 * queue_depth.max(1) as usize;
    let mut bufs: Vec<AlignedBuf> = (0..nbuf)
        .map(|_| alloc(block_bytes.max(1)).map_err(io_err))
        .collect::<Result<_, _>>()?;
    for (i, b) in bufs.iter_mut().enumerate() {
        fill_pattern(b, i as u64 + 7);
    }
    let ranges: Vec<(*const u8, usize)> = bufs.iter().map(|b| (b.as_ptr(), b.len())).collect();
    // SAFETY: `bufs` outlives `tier`: the tier is closed below before
    // `bufs` is dropped.
    unsafe { tier.register_buffers(&ranges)? };
    let ptrs: Vec<usize> = bufs.iter_mut().map(|b| b.as_mut_ptr() as usize).collect();

    // Completions report (buffer, block, location-or-error); a buffer is
    // reused only after its completion arrived.
    type Event = (usize, usize, Result<Option<DiskLocation>, DiskError>);
    let (tx, rx) = mpsc::channel::<Event>();
    let mut locs: Vec<Option<DiskLocation>> = vec![None; blocks];
    let key = |i: usize| (i as u64).to_le_bytes();
    let gone = || DiskError::Invalid("benchmark completion channel closed");

    let t = Instant::now();
    let mut idle: Vec<usize> = (0..nbuf).collect();
    let mut outstanding = 0usize;
    for i in 0..blocks {
        if idle.is_empty() {
            let (b, blk, r) = rx.recv().map_err(|_| gone())?;
            locs[blk] = r?;
            idle.push(b);
            outstanding -= 1;
        }
        let Some(b) = idle.pop() else { break };
        let tx = tx.clone();
        let done: WriteDone = Box::new(move |r| {
            let _ = tx.send((b, i, r.map(|(l, _)| Some(l))));
        });
        // SAFETY: buffer `b` is not reused before its completion reported
        // back, and `bufs` outlives the tier.
        unsafe { tier.submit_write(0, &key(i), ptrs[b] as *const u8, block_bytes, done)? };
        outstanding += 1;
    }
    tier.sync()?;
    let write_secs = t.elapsed().as_secs_f64();
    // sync() returned: every completion callback has run and sent.
    for _ in 0..outstanding {
        let (_, blk, r) = rx.recv().map_err(|_| gone())?;
        locs[blk] = r?;
    }

    let t = Instant::now();
    let mut idle: Vec<usize> = (0..nbuf).collect();
    let mut outstanding = 0usize;
    for (i, loc) in locs.iter().enumerate() {
        let Some(loc) = *loc else {
            return Err(DiskError::Invalid("a benchmark write left no location"));
        };
        if idle.is_empty() {
            let (b, _, r) = rx.recv().map_err(|_| gone())?;
            r?;
            idle.push(b);
            outstanding -= 1;
        }
        let Some(b) = idle.pop() else { break };
        let tx = tx.clone();
        let done: ReadDone = Box::new(move |r| {
            let _ = tx.send((b, i, r.map(|()| None)));
        });
        // SAFETY: as for writes; one read per buffer at a time.
        unsafe { tier.submit_read(loc, 0, &key(i), ptrs[b] as *mut u8, block_bytes, done)? };
        outstanding += 1;
    }
    for _ in 0..outstanding {
        let (_, _, r) = rx.recv().map_err(|_| gone())?;
        r?;
    }
    let read_secs = t.elapsed().as_secs_f64();
    tier.close()?;
    drop(bufs);
    let total = block_bytes as u64 * blocks as u64;
    Ok(BaselineResult {
        write_gbps: gbps(total, write_secs),
        read_gbps: gbps(total, read_secs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baseline_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = baseline(dir.path(), 64 << 10, 64, 8).expect("baseline");
        assert!(r.write_gbps > 0.0 && r.read_gbps > 0.0);
        let r = baseline_with(dir.path(), 64 << 10, 64, 8, true).expect("fixed baseline");
        assert!(r.write_gbps > 0.0 && r.read_gbps > 0.0);
        let r = disk_tier(dir.path(), 64 << 10, 64, 8).expect("tier");
        assert!(r.write_gbps > 0.0 && r.read_gbps > 0.0);
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
    }

    /// `cargo test -p kvbm --release disk_vs_baseline -- --ignored --nocapture`
    /// (env: KVTIER_BENCH_DIR, KVTIER_BENCH_BLOCKS, KVTIER_BENCH_BLOCK_KIB,
    /// KVTIER_BENCH_QD, KVTIER_BENCH_ROUNDS).
    #[test]
    #[ignore]
    fn disk_vs_baseline() {
        let env = |k: &str, d: usize| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        let dir = std::env::var("KVTIER_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| std::env::temp_dir());
        let blocks = env("KVTIER_BENCH_BLOCKS", 1024);
        let block = env("KVTIER_BENCH_BLOCK_KIB", 2048) << 10;
        let qd = env("KVTIER_BENCH_QD", 32) as u32;
        let rounds = env("KVTIER_BENCH_ROUNDS", 3);
        println!(
            "dir={} block={} KiB blocks={blocks} qd={qd}",
            dir.display(),
            block >> 10
        );
        let mut sums = [0f64; 6];
        for round in 0..rounds {
            // Interleaved so drift in the machine's load hits all three.
            let b = baseline(&dir, block, blocks, qd).expect("baseline");
            let t = disk_tier(&dir, block, blocks, qd).expect("tier");
            let f = baseline_with(&dir, block, blocks, qd, true).expect("fixed baseline");
            for (s, v) in sums.iter_mut().zip([
                b.write_gbps,
                b.read_gbps,
                f.write_gbps,
                f.read_gbps,
                t.write_gbps,
                t.read_gbps,
            ]) {
                *s += v;
            }
            println!(
                "round {round}: plain W {:.2} R {:.2} | plain+fixed W {:.2} R {:.2} | tier W {:.2} R {:.2} GB/s",
                b.write_gbps, b.read_gbps, f.write_gbps, f.read_gbps, t.write_gbps, t.read_gbps
            );
        }
        let m: Vec<f64> = sums.iter().map(|s| s / rounds.max(1) as f64).collect();
        println!(
            "mean: plain W {:.2} R {:.2} | plain+fixed W {:.2} R {:.2} | tier W {:.2} R {:.2} GB/s",
            m[0], m[1], m[2], m[3], m[4], m[5]
        );
        println!(
            "tier/plain: write {:.3} read {:.3}; tier/plain+fixed: write {:.3} read {:.3}",
            m[4] / m[0],
            m[5] / m[1],
            m[4] / m[2],
            m[5] / m[3]
        );
    }
}
