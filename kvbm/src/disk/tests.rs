//! Tests of the G3 tier against real files (and a real tmpfs for ENOSPC).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

fn block(len: usize, seed: u64) -> AlignedBuf {
    let mut b = AlignedBuf::new(len).expect("alloc");
    fill(&mut b[..len], seed);
    b
}

fn cfg(path: &Path, capacity: usize, region: usize) -> DiskConfig {
    let mut c = DiskConfig::new(path, capacity as u64);
    c.region_bytes = region as u64;
    c.admit = Admission::Always;
    c
}

fn key(i: usize) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&(i as u64).to_le_bytes());
    k[31] = 0xAB;
    k
}

/// Reads `loc` back into a fresh aligned buffer and compares with `want`.
fn check(tier: &DiskTier, loc: DiskLocation, ns: u32, k: &[u8], want: &[u8]) {
    let mut dst = AlignedBuf::new(want.len()).expect("alloc");
    tier.read_blocking(loc, ns, k, &mut dst).expect("read back");
    assert!(dst[..want.len()] == *want, "data differs at {loc:?}");
}

#[test]
fn disk_round_trip_4k_and_2m() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tier =
        DiskTier::open(cfg(&dir.path().join("g3.dat"), 64 * MIB, 8 * MIB), []).expect("open");
    assert!(tier.stats().direct_io, "ext4 supports O_DIRECT");
    let mut stored = Vec::new();
    for i in 0..200 {
        let b = block(4 * KIB, i as u64);
        let (loc, sum) = tier.write_blocking(1, &key(i), &b).expect("write 4k");
        assert_eq!(sum, xxhash_rust::xxh3::xxh3_64(&b));
        assert_eq!(loc.offset % PAGE as u64, 0);
        stored.push((loc, 1, key(i), b.to_vec()));
    }
    for i in 200..216 {
        let b = block(2 * MIB, i as u64);
        let (loc, _) = tier.write_blocking(1, &key(i), &b).expect("write 2m");
        stored.push((loc, 1, key(i), b.to_vec()));
    }
    // Odd lengths exercise the tail page and the unaligned bounce paths.
    for (j, len) in [1usize, 100, 4095, 4097, 5000, 65536 + 3, 0]
        .into_iter()
        .enumerate()
    {
        let i = 300 + j;
        let mut v = vec![0u8; len + 1];
        fill(&mut v, i as u64);
        let unaligned = &v[1..]; // Vec data + 1: never 4 KiB aligned
        let (loc, _) = tier
            .write_blocking(2, &key(i), unaligned)
            .expect("write odd");
        assert_eq!(loc.len as usize, len);
        stored.push((loc, 2, key(i), unaligned.to_vec()));
    }
    for (loc, ns, k, want) in &stored {
        let ns = *ns;
        check(&tier, *loc, ns, k, want);
        // Unaligned destination too.
        let mut v = vec![0u8; want.len() + 1];
        tier.read_blocking(*loc, ns, k, &mut v[1..])
            .expect("unaligned read");
        assert!(v[1..] == want[..]);
    }
    let st = tier.stats();
    assert_eq!(st.blocks_written, stored.len() as u64);
    assert_eq!(st.checksum_failures + st.bad_headers + st.stale_reads, 0);
    assert!(st.used_bytes > 32 * MIB as u64);
    assert_eq!(st.write_latency.count, stored.len() as u64);
    tier.close().expect("close");
}

#[test]
fn disk_measures_its_own_throughput() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tier =
        DiskTier::open(cfg(&dir.path().join("g3.dat"), 128 * MIB, 16 * MIB), []).expect("open");
    let st = tier.stats();
    assert_eq!((st.read_bytes_per_s, st.write_bytes_per_s), (None, None));
    let b = block(2 * MIB, 7);
    let locs: Vec<_> = (0..40)
        .map(|i| tier.write_blocking(1, &key(i), &b).expect("write").0)
        .collect();
    for (i, loc) in locs.iter().enumerate() {
        check(&tier, *loc, 1, &key(i), &b);
    }
    // 80 MiB each way: one measurement window (64 MiB) completed.
    let st = tier.stats();
    let (r, w) = (st.read_bytes_per_s.unwrap(), st.write_bytes_per_s.unwrap());
    assert!(r > 1e6 && w > 1e6, "read {r} B/s, write {w} B/s");
    tier.close().expect("close");
}

#[test]
fn disk_wrong_identity_is_a_miss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tier = DiskTier::open(cfg(&dir.path().join("g3.dat"), 4 * MIB, MIB), []).expect("open");
    let b = block(8 * KIB, 1);
    let (loc, _) = tier.write_blocking(1, b"abc", &b).expect("write");
    let mut dst = AlignedBuf::new(8 * KIB).expect("alloc");
    let e = |r: Result<(), DiskError>| format!("{:?}", r.expect_err("must miss"));
    assert!(e(tier.read_blocking(loc, 2, b"abc", &mut dst)).starts_with("BadHeader"));
    assert!(e(tier.read_blocking(loc, 1, b"abd", &mut dst)).starts_with("BadHeader"));
    let bad_len = DiskLocation { len: 4096, ..loc };
    assert!(e(tier.read_blocking(bad_len, 1, b"abc", &mut dst)).starts_with("BadHeader"));
    let old_gen = DiskLocation {
        generation: loc.generation + 5,
        ..loc
    };
    assert!(e(tier.read_blocking(old_gen, 1, b"abc", &mut dst)).starts_with("Stale"));
    // An offset with no entry (zeroed preallocated space).
    let nowhere = DiskLocation {
        offset: loc.offset + 64 * KIB as u64,
        ..loc
    };
    assert!(e(tier.read_blocking(nowhere, 1, b"abc", &mut dst)).starts_with("BadHeader"));
    let short = &mut dst[..100];
    assert!(e(tier.read_blocking(loc, 1, b"abc", short)).starts_with("Invalid"));
    assert!(tier.write_blocking(1, &[0u8; 33], &b).is_err());
    check(&tier, loc, 1, b"abc", &b);
}

#[test]
fn disk_fifo_eviction_and_stale_locations() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 4 regions of 1 MiB; 60 KiB blocks + header = 64 KiB: 16 per region.
    let tier = DiskTier::open(cfg(&dir.path().join("g3.dat"), 4 * MIB, MIB), []).expect("open");
    let mut locs = Vec::new();
    for i in 0..100 {
        let b = block(60 * KIB, i as u64);
        let (loc, _) = tier.write_blocking(0, &key(i), &b).expect("write");
        locs.push((loc, b));
    }
    // 100 blocks = 6.25 regions: regions recycled twice (gens 1, 2 gone) and
    // then gen 3 too when the 7th region opened.
    let ev = tier.take_evicted();
    assert_eq!(ev, vec![(0, 1), (1, 2), (2, 3)]);
    assert!(tier.take_evicted().is_empty());
    let st = tier.stats();
    assert_eq!(st.evicted_regions, 3);
    assert_eq!(st.used_bytes, 4 * MIB as u64 - 12 * 64 * KIB as u64);
    let mut dst = AlignedBuf::new(60 * KIB).expect("alloc");
    for (i, (loc, b)) in locs.iter().enumerate() {
        if i < 48 {
            assert!(!tier.is_current(loc));
            let r = tier.read_blocking(*loc, 0, &key(i), &mut dst);
            assert!(matches!(r, Err(DiskError::Stale)), "{i}: {r:?}");
        } else {
            check(&tier, *loc, 0, &key(i), b);
        }
    }
    assert_eq!(tier.stats().stale_reads, 48);
}

/// Flips one byte of the file behind the tier's back (buffered pwrite; the
/// kernel keeps O_DIRECT reads coherent with it).
fn flip(path: &Path, off: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open raw");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).expect("read raw");
    b[0] ^= 0x01;
    f.write_all_at(&b, off).expect("write raw");
    f.sync_all().expect("sync raw");
}

#[test]
fn disk_corruption_is_reported_never_returned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("g3.dat");
    let tier = DiskTier::open(cfg(&path, 8 * MIB, 2 * MIB), []).expect("open");
    let mut locs = Vec::new();
    for i in 0..6 {
        let b = block(64 * KIB + 10, i as u64);
        let (loc, _) = tier.write_blocking(3, &key(i), &b).expect("write");
        locs.push((loc, b));
    }
    tier.sync().expect("sync");
    let data_at = |i: usize, o: u64| locs[i].0.offset + PAGE as u64 + o;
    flip(&path, data_at(0, 0)); // first data byte
    flip(&path, data_at(1, 64 * KIB as u64 + 5)); // inside the tail page
    flip(&path, locs[2].0.offset + 3); // magic
    flip(&path, locs[3].0.offset + 50); // key byte
    flip(&path, locs[4].0.offset + 125); // header checksum
    let mut dst = AlignedBuf::new(80 * KIB).expect("alloc");
    let mut r = |i: usize| tier.read_blocking(locs[i].0, 3, &key(i), &mut dst);
    assert!(matches!(r(0), Err(DiskError::ChecksumMismatch)));
    assert!(matches!(r(1), Err(DiskError::ChecksumMismatch)));
    assert!(matches!(r(2), Err(DiskError::BadHeader)));
    assert!(matches!(r(3), Err(DiskError::BadHeader)));
    assert!(matches!(r(4), Err(DiskError::BadHeader)));
    assert!(r(5).is_ok());
    let st = tier.stats();
    assert_eq!((st.checksum_failures, st.bad_headers), (2, 3));
    // Corruption is a miss, not a reason to stop writing.
    assert!(st.degraded.is_none());
}

#[test]
fn disk_reopen_keeps_recovered_regions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("g3.dat");
    let c = cfg(&path, 4 * MIB, MIB);
    let tier = DiskTier::open(c.clone(), []).expect("open");
    let mut old = Vec::new();
    // 20 × 64 KiB entries: region 0 full, region 1 partly used.
    for i in 0..20 {
        let b = block(60 * KIB, i as u64);
        let (loc, _) = tier.write_blocking(0, &key(i), &b).expect("write");
        old.push((loc, b));
    }
    tier.sync().expect("sync");
    // What a catalog would pass: the regions its locations refer to.
    let mut recovered: Vec<RegionState> = old
        .iter()
        .map(|(l, _)| RegionState {
            region: l.region,
            generation: l.generation,
        })
        .collect();
    recovered.dedup();
    assert_eq!(recovered, tier.live_regions());
    drop(tier);

    let tier = DiskTier::open(c, recovered).expect("reopen");
    for (i, (loc, b)) in old.iter().enumerate() {
        check(&tier, *loc, 0, &key(i), b);
    }
    // Fill the two free regions: the recovered ones must not be touched.
    let mut new = Vec::new();
    for i in 100..132 {
        let b = block(60 * KIB, i as u64);
        let (loc, _) = tier.write_blocking(0, &key(i), &b).expect("write new");
        assert!(loc.region >= 2, "new write landed in a recovered region");
        assert!(loc.generation > 2);
        new.push((i, loc, b));
    }
    for (i, (loc, b)) in old.iter().enumerate() {
        check(&tier, *loc, 0, &key(i), b);
    }
    // One more: FIFO recycles the oldest recovered region (0, gen 1).
    let b = block(60 * KIB, 999);
    let (loc, _) = tier.write_blocking(0, &key(999), &b).expect("write");
    assert_eq!(loc.region, 0);
    assert_eq!(tier.take_evicted(), vec![(0, 1)]);
    let mut dst = AlignedBuf::new(60 * KIB).expect("alloc");
    assert!(matches!(
        tier.read_blocking(old[0].0, 0, &key(0), &mut dst),
        Err(DiskError::Stale)
    ));
    check(&tier, old[19].0, 0, &key(19), &old[19].1);
    for (i, loc, b) in &new {
        check(&tier, *loc, 0, &key(*i), b);
    }
}

#[test]
fn disk_queue_full_drops_without_blocking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cfg(&dir.path().join("g3.dat"), 64 * MIB, 16 * MIB);
    c.write_queue = 2;
    c.queue_depth = 1;
    let tier = DiskTier::open(c, []).expect("open");
    let b = Arc::new(block(2 * MIB, 5));
    let ok = Arc::new(AtomicUsize::new(0));
    let (mut accepted, mut full) = (0, 0);
    let t = Instant::now();
    for i in 0..20 {
        let ok2 = ok.clone();
        let hold = b.clone(); // keeps the source alive until completion
        let done: WriteDone = Box::new(move |r| {
            drop(hold);
            if r.is_ok() {
                ok2.fetch_add(1, Ordering::SeqCst);
            }
        });
        // SAFETY: `hold` inside the callback keeps the buffer alive until the
        // write completed; nobody writes to it.
        match unsafe { tier.submit_write(0, &key(i), b.as_ptr(), 2 * MIB, done) } {
            Ok(()) => accepted += 1,
            Err(DiskError::QueueFull) => full += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    let submit_time = t.elapsed();
    assert!(full > 0, "queue of 2 never filled");
    assert!(
        submit_time < Duration::from_millis(200),
        "submits blocked: {submit_time:?}"
    );
    tier.sync().expect("sync");
    assert_eq!(ok.load(Ordering::SeqCst), accepted);
    let st = tier.stats();
    assert_eq!(st.dropped_writes, full as u64);
    assert_eq!(st.blocks_written, accepted as u64);
    assert_eq!(st.pending_writes, 0);
}

#[test]
fn disk_admission_policies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cfg(&dir.path().join("g3.dat"), 4 * MIB, MIB);
    let always = DiskTier::open(c.clone(), []).expect("open");
    assert!(always.admit(1, b"x") && always.admit(1, b"x"));
    drop(always);
    c.admit = Admission::Frequency;
    let freq = DiskTier::open(c, []).expect("open");
    assert!(!freq.admit(1, b"x"));
    assert!(freq.admit(1, b"x"));
    assert!(!freq.admit(1, b"y"));
}

#[test]
fn disk_callbacks_may_panic_and_resubmit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tier =
        Arc::new(DiskTier::open(cfg(&dir.path().join("g3.dat"), 4 * MIB, MIB), []).expect("open"));
    let b = block(4 * KIB, 1);
    // SAFETY: `b` outlives the tier's I/O: we sync before dropping it.
    unsafe {
        tier.submit_write(
            0,
            b"p",
            b.as_ptr(),
            4 * KIB,
            Box::new(|_| panic!("callback panics")),
        )
        .expect("submit");
    }
    tier.sync().expect("sync");
    // The ring survived the panic.
    let (loc, _) = tier.write_blocking(0, b"q", &b).expect("write after panic");
    check(&tier, loc, 0, b"q", &b);
}

/// CPU time (user + system clock ticks) a thread of this process has used.
fn thread_ticks(tid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).expect("stat");
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

#[test]
fn disk_idle_ring_sleeps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tier = DiskTier::open(cfg(&dir.path().join("g3.dat"), 4 * MIB, MIB), []).expect("open");
    let b = block(4 * KIB, 1);
    let (loc, _) = tier.write_blocking(0, b"k", &b).expect("write");
    let tid = tier.rings[0].tid;
    let before = thread_ticks(tid);
    std::thread::sleep(Duration::from_millis(1500));
    let used = thread_ticks(tid) - before;
    // A spinning thread would use ~150 ticks (100 Hz) here.
    assert!(used <= 2, "idle ring thread used {used} ticks in 1.5 s");
    // And it still wakes up for new work.
    check(&tier, loc, 0, b"k", &b);
}

/// RAII tmpfs mount for the ENOSPC test.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn disk_enospc_degrades_and_keeps_reading() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&mnt)
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must be able to mount a tmpfs"
        );
        eprintln!(
            "skipping disk_enospc_degrades_and_keeps_reading: cannot mount tmpfs (not root?)"
        );
        return;
    }
    let _mount = Tmpfs(mnt.clone());
    // 16 regions of 1 MiB on a 4 MiB file system: the 5th region's
    // preallocation (or a write) must fail with ENOSPC.
    let tier = DiskTier::open(cfg(&mnt.join("g3.dat"), 16 * MIB, MIB), []).expect("open");
    let mut stored = Vec::new();
    let mut refused = None;
    for i in 0..80 {
        let b = block(252 * KIB, i as u64);
        match tier.write_blocking(0, &key(i), &b) {
            Ok((loc, _)) => stored.push((i, loc, b)),
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (at, e) = refused.expect("a 4 MiB tmpfs never filled");
    assert!(matches!(e, DiskError::NoSpace), "{e:?}");
    assert!(at >= 8, "failed too early ({at})");
    let st = tier.stats();
    let reason = st.degraded.expect("degraded");
    assert!(
        reason.contains("No space") || reason.contains("ENOSPC") || reason.contains("space"),
        "{reason}"
    );
    let b = block(4 * KIB, 0);
    assert!(matches!(
        tier.write_blocking(0, b"z", &b),
        Err(DiskError::Degraded(_))
    ));
    assert!(tier.stats().dropped_writes >= 2);
    for (i, loc, b) in &stored {
        check(&tier, *loc, 0, &key(*i), b);
    }
    drop(tier);
}

/// Child half of the kill -9 test: writes, syncs, records locations, then
/// writes more without syncing and SIGKILLs itself.
#[test]
#[ignore]
fn disk_crash_child() {
    let Some(dir) = std::env::var_os("KVTIER_CRASH_DIR") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let tier = DiskTier::open(cfg(&dir.join("g3.dat"), 32 * MIB, 4 * MIB), []).expect("open");
    let mut lines = String::new();
    for i in 0..40 {
        let b = block(200 * KIB + i, i as u64);
        let (loc, _) = tier.write_blocking(7, &key(i), &b).expect("write");
        lines += &format!(
            "{i} {} {} {} {}\n",
            loc.region, loc.generation, loc.offset, loc.len
        );
    }
    tier.sync().expect("sync");
    std::fs::write(dir.join("catalog.txt"), lines).expect("catalog");
    // Unsynced writes still in flight when the process dies.
    let b = Arc::new(block(2 * MIB, 99));
    for i in 100..110 {
        let hold = b.clone();
        // SAFETY: the buffer is leaked by the kill below; never freed.
        let _ = unsafe {
            tier.submit_write(
                7,
                &key(i),
                b.as_ptr(),
                2 * MIB,
                Box::new(move |_| drop(hold)),
            )
        };
    }
    // SAFETY: plain syscall; this process dies here.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
}

#[test]
fn disk_warm_restart_after_kill9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("exe");
    let status = std::process::Command::new(exe)
        .args([
            "--exact",
            "disk::tests::disk_crash_child",
            "--ignored",
            "--nocapture",
        ])
        .env("KVTIER_CRASH_DIR", dir.path())
        .status()
        .expect("spawn child");
    assert!(!status.success(), "child was supposed to die by SIGKILL");
    let catalog = std::fs::read_to_string(dir.path().join("catalog.txt")).expect("catalog");
    let mut locs = Vec::new();
    for line in catalog.lines() {
        let v: Vec<u64> = line.split(' ').map(|x| x.parse().expect("num")).collect();
        locs.push((
            v[0] as usize,
            DiskLocation {
                region: v[1] as u32,
                generation: v[2],
                offset: v[3],
                len: v[4] as u32,
                raw_len: v[4] as u32,
            },
        ));
    }
    assert_eq!(locs.len(), 40);
    let mut recovered: Vec<RegionState> = locs
        .iter()
        .map(|(_, l)| RegionState {
            region: l.region,
            generation: l.generation,
        })
        .collect();
    recovered.dedup();
    let tier = DiskTier::open(
        cfg(&dir.path().join("g3.dat"), 32 * MIB, 4 * MIB),
        recovered,
    )
    .expect("reopen");
    for (i, loc) in &locs {
        let want = block(200 * KIB + i, *i as u64);
        check(&tier, *loc, 7, &key(*i), &want[..200 * KIB + i]);
    }
    let (loc, _) = tier
        .write_blocking(7, b"after", &block(4 * KIB, 3))
        .expect("write after restart");
    assert!(locs.iter().all(|(_, l)| l.region != loc.region));
}

/// Entries through a codec: compressed, encrypted, both, and what a tier
/// configured otherwise makes of them.
#[cfg(feature = "at-rest")]
mod at_rest {
    use super::*;
    use crate::config::Compression;
    use crate::disk::entry::{round_up, CODEC_LZ4};

    const KEY_A: [u8; 32] = [0x5a; 32];
    const KEY_B: [u8; 32] = [0xa5; 32];
    /// What a prompt's KV bytes are made of here: easy to find in a file.
    const MARKER: &[u8; 16] = b"PROMPT-SECRET-42";
    const COMPRESSIONS: [Compression; 3] = [Compression::None, Compression::Lz4, Compression::Zstd];

    fn coded(path: &Path, comp: Compression, secret: Option<&[u8; 32]>) -> DiskConfig {
        let mut c = cfg(path, 32 * MIB, 4 * MIB);
        c.codec = Some(Arc::new(DiskCodec::new(comp, 3, secret)));
        c
    }

    /// Compressible and recognisable: the marker every 64 bytes, and each
    /// 256 bytes followed by a copy of themselves (lz4 about halves it).
    fn kv(len: usize, seed: u64) -> AlignedBuf {
        let mut b = block(len, seed);
        for chunk in b[..len].chunks_mut(64) {
            let n = chunk.len().min(16);
            chunk[..n].copy_from_slice(&MARKER[..n]);
        }
        for c in (256..len).step_by(512) {
            b.copy_within(c - 256..c, c);
        }
        b
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    /// Rewrites the header page of the entry at `offset` with `f`, then
    /// makes its header checksum right again (a forger who knows the
    /// format, not the key).
    fn patch_header(path: &Path, offset: u64, f: impl FnOnce(&mut [u8])) {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open raw");
        let mut page = vec![0u8; PAGE];
        file.read_exact_at(&mut page, offset).expect("read header");
        f(&mut page);
        let sum = xxhash_rust::xxh3::xxh3_64(&page[..120]);
        page[120..128].copy_from_slice(&sum.to_le_bytes());
        file.write_all_at(&page, offset).expect("write header");
        file.sync_all().expect("sync raw");
    }

    /// The stored bytes of the entry at `loc`.
    fn stored(path: &Path, loc: &DiskLocation) -> Vec<u8> {
        let file = std::fs::File::open(path).expect("open raw");
        let mut v = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut v, loc.offset + PAGE as u64)
            .expect("read data");
        v
    }

    fn regions(locs: &[DiskLocation]) -> Vec<RegionState> {
        let mut r: Vec<RegionState> = locs
            .iter()
            .map(|l| RegionState {
                region: l.region,
                generation: l.generation,
            })
            .collect();
        r.sort_by_key(|s| s.generation);
        r.dedup();
        r
    }

    fn err(r: Result<(), DiskError>) -> String {
        format!("{:?}", r.expect_err("must miss"))
    }

    #[test]
    fn disk_every_codec_round_trips_bit_exact() {
        for comp in COMPRESSIONS {
            for secret in [None, Some(&KEY_A)] {
                let what = format!("{comp:?} key={}", secret.is_some());
                let dir = tempfile::tempdir().expect("tempdir");
                let path = dir.path().join("g3.dat");
                let tier = DiskTier::open(coded(&path, comp, secret), []).expect("open");
                let mut stored_ = Vec::new();
                // Aligned sources: a compressible 2 MiB block, an
                // incompressible one.
                for (i, b) in [(0, kv(2 * MIB, 1)), (1, block(64 * KIB, 2))] {
                    let (loc, sum) = tier.write_blocking(1, &key(i), &b).expect("write");
                    assert_eq!(loc.raw_len as usize, b.len(), "{what}");
                    assert_eq!(sum, xxhash_rust::xxh3::xxh3_64(&stored(&path, &loc)));
                    stored_.push((loc, 1, key(i), b.to_vec()));
                }
                let (kv_loc, rnd_loc) = (stored_[0].0, stored_[1].0);
                if comp == Compression::None {
                    assert_eq!(kv_loc.len, kv_loc.raw_len, "{what}");
                } else {
                    assert!(kv_loc.len < kv_loc.raw_len / 2, "{what}: {kv_loc:?}");
                }
                assert_eq!(rnd_loc.len, rnd_loc.raw_len, "{what}: random stays raw");
                // Odd lengths from unaligned sources, the empty block too.
                for (j, len) in [1usize, 100, 4095, 4097, 5000, 65536 + 3, 0]
                    .into_iter()
                    .enumerate()
                {
                    let i = 10 + j;
                    let mut v = vec![0u8; len + 1];
                    v[1..].copy_from_slice(&kv(len.max(1), i as u64)[..len]);
                    let (loc, _) = tier.write_blocking(2, &key(i), &v[1..]).expect("write odd");
                    stored_.push((loc, 2, key(i), v[1..].to_vec()));
                }
                for (loc, ns, k, want) in &stored_ {
                    check(&tier, *loc, *ns, k, want);
                    let mut v = vec![0u8; want.len() + 1];
                    tier.read_blocking(*loc, *ns, k, &mut v[1..])
                        .expect("unaligned read");
                    assert!(v[1..] == want[..], "{what}: {loc:?}");
                }
                let st = tier.stats();
                let raw: u64 = stored_.iter().map(|s| s.3.len() as u64).sum();
                assert_eq!(st.bytes_written, raw, "{what}: block bytes counted");
                assert_eq!(
                    st.checksum_failures
                        + st.bad_headers
                        + st.stale_reads
                        + st.foreign_entries
                        + st.decode_failures,
                    0,
                    "{what}"
                );
                tier.close().expect("close");
                // Reading follows each entry's codec byte: a tier set to
                // another compression (the same key) reads them all.
                let other = match comp {
                    Compression::Zstd => Compression::Lz4,
                    _ => Compression::Zstd,
                };
                let locs: Vec<_> = stored_.iter().map(|s| s.0).collect();
                let tier =
                    DiskTier::open(coded(&path, other, secret), regions(&locs)).expect("reopen");
                for (loc, ns, k, want) in &stored_ {
                    check(&tier, *loc, *ns, k, want);
                }
            }
        }
    }

    #[test]
    fn disk_encrypted_files_hold_no_plaintext() {
        for comp in COMPRESSIONS {
            for secret in [None, Some(&KEY_A)] {
                let dir = tempfile::tempdir().expect("tempdir");
                let path = dir.path().join("g3.dat");
                let tier = DiskTier::open(coded(&path, comp, secret), []).expect("open");
                let blocks: Vec<AlignedBuf> = (0..4).map(|i| kv(256 * KIB, i)).collect();
                for (i, b) in blocks.iter().enumerate() {
                    tier.write_blocking(1, &key(i), b).expect("write");
                }
                tier.close().expect("close");
                let file = std::fs::read(&path).expect("read file");
                let windows: Vec<&[u8]> = blocks
                    .iter()
                    .flat_map(|b| [&b[16..48], &b[4096 + 16..4096 + 48], &b[200 * KIB..][..32]])
                    .collect();
                let what = format!("{comp:?} key={}", secret.is_some());
                if secret.is_some() {
                    assert!(!contains(&file, MARKER), "{what}: the marker in the clear");
                    for w in &windows {
                        assert!(!contains(&file, w), "{what}: block bytes in the clear");
                    }
                } else {
                    // The control: without a key, the bytes are there.
                    assert!(contains(&file, MARKER), "{what}");
                }
            }
        }
    }

    #[test]
    fn disk_another_key_or_none_is_a_miss_and_destroys_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("g3.dat");
        let tier = DiskTier::open(coded(&path, Compression::Lz4, Some(&KEY_A)), []).expect("open");
        let blocks: Vec<AlignedBuf> = vec![kv(64 * KIB, 1), block(64 * KIB, 2)];
        let locs: Vec<DiskLocation> = blocks
            .iter()
            .enumerate()
            .map(|(i, b)| tier.write_blocking(1, &key(i), b).expect("write").0)
            .collect();
        assert!(locs[0].len < locs[0].raw_len, "lz4 kept");
        tier.close().expect("close");
        let mut dst = AlignedBuf::new(64 * KIB).expect("alloc");
        let others = [
            coded(&path, Compression::Lz4, Some(&KEY_B)),
            coded(&path, Compression::None, None),
            cfg(&path, 32 * MIB, 4 * MIB),
        ];
        for c in others {
            let tier = DiskTier::open(c, regions(&locs)).expect("reopen");
            for (i, loc) in locs.iter().enumerate() {
                let e = err(tier.read_blocking(*loc, 1, &key(i), &mut dst));
                assert!(e.starts_with("Foreign"), "{e}");
            }
            let st = tier.stats();
            assert_eq!((st.foreign_entries, st.decode_failures), (2, 0));
            assert_eq!(st.checksum_failures + st.bad_headers, 0);
        }
        // The right key still reads them: a miss elsewhere damaged nothing.
        let tier = DiskTier::open(
            coded(&path, Compression::Zstd, Some(&KEY_A)),
            regions(&locs),
        )
        .expect("reopen");
        for (i, loc) in locs.iter().enumerate() {
            check(&tier, *loc, 1, &key(i), &blocks[i]);
        }
    }

    #[test]
    fn disk_tampered_or_moved_ciphertext_is_a_miss() {
        for comp in [Compression::None, Compression::Lz4] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("g3.dat");
            let tier = DiskTier::open(coded(&path, comp, Some(&KEY_A)), []).expect("open");
            let b = kv(64 * KIB, 7);
            let locs: Vec<DiskLocation> = (0..10)
                .map(|i| tier.write_blocking(1, &key(i), &b).expect("write").0)
                .collect();
            tier.sync().expect("sync");
            let data_sum = |path: &Path, loc: &DiskLocation| {
                xxhash_rust::xxh3::xxh3_64(&stored(path, loc)).to_le_bytes()
            };
            // 0: a flipped ciphertext byte: the checksum catches it first.
            flip(&path, locs[0].offset + PAGE as u64 + 100);
            // 1: the same, its data checksum forged to match: the tag.
            flip(&path, locs[1].offset + PAGE as u64 + 100);
            let sum = data_sum(&path, &locs[1]);
            patch_header(&path, locs[1].offset, |p| p[40..48].copy_from_slice(&sum));
            // 2, 3: nonce and tag.
            patch_header(&path, locs[2].offset, |p| p[95] ^= 1);
            patch_header(&path, locs[3].offset, |p| p[110] ^= 1);
            // 4: the codec byte, encryption kept: lz4 made zstd (the tag
            // refuses it), or an uncompressed entry made lz4 with a larger
            // raw length (the identity check refuses it first).
            patch_header(&path, locs[4].offset, |p| {
                if p[37] & 3 == 0 {
                    p[80..84].copy_from_slice(&(64 * KIB as u32 + 1).to_le_bytes());
                    p[37] |= CODEC_LZ4;
                } else {
                    p[37] ^= 3;
                }
            });
            // 5: the key id: not this tier's key.
            patch_header(&path, locs[5].offset, |p| p[84] ^= 1);
            // 6: entry 7 copied over entry 6's place, its header made to
            // name the new place (read there as block 7): bound to where
            // it was written.
            let raw = std::fs::read(&path).expect("read");
            let n = PAGE + round_up(u64::from(locs[7].len)) as usize;
            let at7 = locs[7].offset as usize;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("open raw");
            f.write_all_at(&raw[at7..at7 + n], locs[6].offset)
                .expect("copy entry");
            let (off6, gen6) = (locs[6].offset, locs[6].generation);
            patch_header(&path, off6, |p| {
                p[16..24].copy_from_slice(&gen6.to_le_bytes());
                p[24..32].copy_from_slice(&off6.to_le_bytes());
            });
            // 7 stays as it was; 8: its header made to name block 9.
            patch_header(&path, locs[8].offset, |p| {
                p[48..80].copy_from_slice(&key(9))
            });
            let mut dst = AlignedBuf::new(64 * KIB).expect("alloc");
            let mut r = |i: usize| {
                let k = match i {
                    6 => key(7),
                    8 => key(9),
                    _ => key(i),
                };
                err(tier.read_blocking(locs[i], 1, &k, &mut dst))
            };
            let codec_flip = if comp == Compression::None {
                "BadHeader"
            } else {
                "Undecodable"
            };
            let want = [
                "ChecksumMismatch",
                "Undecodable",
                "Undecodable",
                "Undecodable",
                codec_flip,
                "Foreign",
                "Undecodable",
            ];
            for (i, w) in want.iter().enumerate() {
                let got = r(i);
                assert!(got.starts_with(w), "{comp:?} entry {i}: {got}");
            }
            let got = r(8);
            assert!(got.starts_with("Undecodable"), "{comp:?} entry 8: {got}");
            let st = tier.stats();
            assert_eq!(st.checksum_failures, 1, "{comp:?}");
            assert_eq!(st.foreign_entries, 1, "{comp:?}");
            check(&tier, locs[7], 1, &key(7), &b);
            check(&tier, locs[9], 1, &key(9), &b);
        }
    }

    #[test]
    fn disk_clear_entries_are_a_miss_where_a_key_is_set_and_the_converse() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("g3.dat");
        let b = kv(64 * KIB, 3);
        // In the clear: one stored as is (no codec), one compressed only.
        let plain = DiskTier::open(cfg(&path, 32 * MIB, 4 * MIB), []).expect("open");
        let (l0, _) = plain.write_blocking(1, &key(0), &b).expect("write");
        drop(plain);
        let lz4 =
            DiskTier::open(coded(&path, Compression::Lz4, None), regions(&[l0])).expect("open");
        let (l1, _) = lz4.write_blocking(1, &key(1), &b).expect("write");
        assert!(l1.len < l1.raw_len);
        // Each reads the other's: a compressing tier the entry stored as
        // is, a tier without a codec the compressed one.
        check(&lz4, l0, 1, &key(0), &b);
        drop(lz4);
        let plain =
            DiskTier::open(cfg(&path, 32 * MIB, 4 * MIB), regions(&[l0, l1])).expect("open");
        check(&plain, l1, 1, &key(1), &b);
        // An encrypting tier serves neither; what it writes, the tiers
        // without a key never serve.
        drop(plain);
        let keyed = DiskTier::open(
            coded(&path, Compression::None, Some(&KEY_A)),
            regions(&[l0, l1]),
        )
        .expect("open");
        let mut dst = AlignedBuf::new(64 * KIB).expect("alloc");
        for (i, l) in [l0, l1].iter().enumerate() {
            let e = err(keyed.read_blocking(*l, 1, &key(i), &mut dst));
            assert!(e.starts_with("Foreign"), "{e}");
        }
        let (l2, _) = keyed.write_blocking(1, &key(2), &b).expect("write");
        drop(keyed);
        let all = regions(&[l0, l1, l2]);
        for c in [
            cfg(&path, 32 * MIB, 4 * MIB),
            coded(&path, Compression::Lz4, None),
        ] {
            let t = DiskTier::open(c, all.clone()).expect("open");
            let e = err(t.read_blocking(l2, 1, &key(2), &mut dst));
            assert!(e.starts_with("Foreign"), "{e}");
            check(&t, l0, 1, &key(0), &b);
        }
    }

    #[test]
    fn disk_old_version_entries_are_a_miss() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("g3.dat");
        let tier = DiskTier::open(cfg(&path, 32 * MIB, 4 * MIB), []).expect("open");
        let b = block(8 * KIB, 1);
        let locs: Vec<DiskLocation> = (0..2)
            .map(|i| tier.write_blocking(1, &key(i), &b).expect("write").0)
            .collect();
        tier.sync().expect("sync");
        // What version 1 wrote: the same fields, no codec, no raw length.
        for l in &locs {
            patch_header(&path, l.offset, |p| {
                p[8..12].copy_from_slice(&1u32.to_le_bytes());
                p[37..40].fill(0);
                p[80..120].fill(0);
            });
        }
        let mut dst = AlignedBuf::new(8 * KIB).expect("alloc");
        let e = err(tier.read_blocking(locs[0], 1, &key(0), &mut dst));
        assert!(e.starts_with("BadHeader"), "{e}");
        drop(tier);
        // The same through a tier with a codec (after an upgrade that set
        // one): still a miss, never misread.
        let keyed = DiskTier::open(coded(&path, Compression::Lz4, Some(&KEY_A)), regions(&locs))
            .expect("open");
        let e = err(keyed.read_blocking(locs[1], 1, &key(1), &mut dst));
        assert!(e.starts_with("BadHeader"), "{e}");
        assert_eq!(keyed.stats().bad_headers, 1);
    }

    #[test]
    fn disk_a_stored_length_beyond_the_raw_length_is_refused_before_reading() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("g3.dat");
        let tier = DiskTier::open(coded(&path, Compression::Lz4, Some(&KEY_A)), []).expect("open");
        let b = kv(16 * KIB, 1);
        let (loc, _) = tier.write_blocking(1, &key(0), &b).expect("write");
        let mut dst = AlignedBuf::new(64 * KIB).expect("alloc");
        let huge = DiskLocation {
            len: 1 << 30,
            ..loc
        };
        assert!(err(tier.read_blocking(huge, 1, &key(0), &mut dst)).starts_with("Invalid"));
        // Another raw length than the entry's: the identity check.
        let other = DiskLocation {
            raw_len: 8 * KIB as u32,
            ..loc
        };
        assert!(err(tier.read_blocking(other, 1, &key(0), &mut dst)).starts_with("BadHeader"));
        check(&tier, loc, 1, &key(0), &b);
    }
}
