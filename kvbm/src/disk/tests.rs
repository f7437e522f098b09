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
