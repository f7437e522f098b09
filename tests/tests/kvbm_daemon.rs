//! The kvbm daemon as a real process: tiers, warm restart, faults, clients.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use kvtier_client::{v1, Client, Pool};
use kvtier_e2e::{bin, rt, Kvbm};
use rand::{Rng, RngCore, SeedableRng};

const KIB: usize = 1024;

fn key(i: u64) -> Vec<u8> {
    let mut k = b"k".to_vec();
    k.extend_from_slice(&i.to_be_bytes());
    k
}

fn data(i: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(i).fill_bytes(&mut v);
    v
}

async fn put(c: &Client, ns: &str, i: u64, len: usize) -> Result<bool, tonic::Status> {
    Ok(c.rpc()
        .put(v1::PutRequest {
            namespace: ns.into(),
            block: Some(v1::BlockMeta {
                key: key(i),
                parent: if i == 0 { vec![] } else { key(i - 1) },
                token_ids: (0..16).map(|t| (i * 16 + t) as u32).collect(),
            }),
            data: data(i, len),
        })
        .await?
        .into_inner()
        .stored)
}

async fn get(c: &Client, ns: &str, i: u64) -> Result<Vec<u8>, tonic::Status> {
    Ok(c.rpc()
        .get(v1::GetRequest {
            namespace: ns.into(),
            key: key(i),
        })
        .await?
        .into_inner()
        .data)
}

async fn stats(c: &Client) -> HashMap<i32, v1::TierStats> {
    c.stats()
        .await
        .unwrap()
        .tiers
        .into_iter()
        .map(|t| (t.tier, t))
        .collect()
}

const HOST: i32 = v1::Tier::Host as i32;
const DISK: i32 = v1::Tier::Disk as i32;

/// More data than the host tier holds: the overflow is served from disk,
/// bit-exact, through the CLI too.
#[test]
fn blocks_beyond_host_capacity_come_back_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let d = Kvbm::start(
        dir.path(),
        &[
            "--host-bytes",
            "4MiB",
            "--disk-bytes",
            "64MiB",
            "--region-bytes",
            "1MiB",
        ],
    )
    .unwrap();
    let len = 256 * KIB;
    let n = 48u64; // 12 MiB: three times the host pool
    rt().block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        c.register_namespace("m", len as u64).await.unwrap();
        for i in 0..n {
            assert!(put(&c, "m", i, len).await.unwrap());
            // Let write-behind keep up so no write is dropped.
            if i % 8 == 7 {
                c.sync().await.unwrap();
            }
        }
        assert_eq!(c.sync().await.unwrap(), n);
        let s = stats(&c).await;
        assert!(s[&HOST].blocks < n, "host holds at most 4 MiB");
        assert!(s[&HOST].evictions > 0);
        for i in 0..n {
            assert_eq!(get(&c, "m", i).await.unwrap(), data(i, len), "block {i}");
        }
        let chain: Vec<_> = (0..n).map(key).collect();
        let l = c.lookup("m", chain).await.unwrap();
        assert_eq!(l.matched as u64, n);
    });
    // The CLI: put from stdin, get to stdout, exit 1 on a miss.
    let kvtier = |args: &[&str], input: Option<&[u8]>| {
        use std::io::Write;
        let mut cmd = Command::new(bin("kvtier"));
        cmd.arg("--socket").arg(&d.socket).args(args);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        if let Some(b) = input {
            stdin.write_all(b).unwrap();
        }
        drop(stdin);
        child.wait_with_output().unwrap()
    };
    let block = data(999, len);
    let out = kvtier(
        &["block", "put", "--ns", "m", "--key", "abcd"],
        Some(&block),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kvtier(&["block", "get", "--ns", "m", "--key", "abcd"], None);
    assert!(out.status.success());
    assert_eq!(out.stdout, block);
    let out = kvtier(&["block", "get", "--ns", "m", "--key", "abce"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("miss"));
    let out = kvtier(
        &["block", "put", "--ns", "m", "--key", "ab"],
        Some(b"short"),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bytes"));
    let out = kvtier(
        &[
            "lookup",
            "--ns",
            "m",
            "6b0000000000000000",
            "6b0000000000000001",
        ],
        None,
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("matched 2/2"));
    let out = kvtier(&["stats", "--json"], None);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"tier\":\"disk\""));
}

/// Every block `sync` reported durable survives `kill -9` mid-write and is
/// served bit-exact after the restart; a clean stop keeps them too.
#[test]
fn kill9_during_writes_then_warm_restart() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--host-bytes",
        "8MiB",
        "--disk-bytes",
        "128MiB",
        "--region-bytes",
        "2MiB",
    ];
    let d = Kvbm::start(dir.path(), &args).unwrap();
    let len = 64 * KIB;
    let rt = rt();
    let durable = rt.block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        c.register_namespace("m", len as u64).await.unwrap();
        for i in 0..200 {
            put(&c, "m", i, len).await.unwrap();
        }
        assert_eq!(c.sync().await.unwrap(), 200);
        // Sustained writes, killed in the middle.
        let _writer = {
            let c = c.clone();
            tokio::spawn(async move {
                for i in 200..100_000 {
                    if put(&c, "m", i, len).await.is_err() {
                        return i;
                    }
                }
                100_000
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        200u64
    });
    d.kill9();
    let d = Kvbm::start(dir.path(), &args).unwrap();
    rt.block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        for i in 0..durable {
            assert_eq!(get(&c, "m", i).await.unwrap(), data(i, len), "block {i}");
        }
        // Whatever else came back must be exact too (never wrong bytes).
        for i in durable..durable + 200 {
            if let Ok(b) = get(&c, "m", i).await {
                assert_eq!(b, data(i, len), "block {i}");
            }
        }
        let s = stats(&c).await;
        assert_eq!(s[&DISK].checksum_failures, 0);
    });
    let status = d.stop().unwrap();
    assert!(status.success(), "SIGTERM exits cleanly: {status}");
    let d = Kvbm::start(dir.path(), &args).unwrap();
    rt.block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        assert_eq!(get(&c, "m", 7).await.unwrap(), data(7, len));
    });
}

/// Flipped bytes in the region file: those blocks are misses (and removed),
/// never wrong data.
#[test]
fn corrupt_disk_bytes_are_misses() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--host-bytes",
        "4MiB",
        "--disk-bytes",
        "32MiB",
        "--region-bytes",
        "1MiB",
    ];
    let d = Kvbm::start(dir.path(), &args).unwrap();
    let len = 64 * KIB;
    let n = 40u64;
    let rt = rt();
    rt.block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        c.register_namespace("m", len as u64).await.unwrap();
        for i in 0..n {
            put(&c, "m", i, len).await.unwrap();
        }
        assert_eq!(c.sync().await.unwrap(), n);
    });
    assert!(d.stop().unwrap().success());
    // Flip one byte in every 64 KiB of the file: headers and data alike.
    let path = dir.path().join("g3.dat");
    let mut file = std::fs::read(&path).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let used = file.len().min(((len + 4096) * n as usize) + 4096);
    for chunk in 0..used / (64 * KIB) {
        let at = chunk * 64 * KIB + rng.random_range(0..64 * KIB);
        file[at] ^= 0x5a;
    }
    std::fs::write(&path, &file).unwrap();
    let d = Kvbm::start(dir.path(), &args).unwrap();
    rt.block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        let mut misses = 0;
        for i in 0..n {
            match get(&c, "m", i).await {
                Ok(b) => assert_eq!(b, data(i, len), "block {i} served with wrong bytes"),
                Err(s) => {
                    assert_eq!(s.code(), tonic::Code::NotFound, "{s}");
                    misses += 1;
                }
            }
        }
        assert!(
            misses > n / 2,
            "most blocks were corrupted: {misses} misses"
        );
        let s = stats(&c).await;
        assert!(s[&DISK].checksum_failures > 0);
        // A corrupt block is removed: asking again is a plain miss.
        let l = c.lookup("m", (0..n).map(key).collect()).await.unwrap();
        assert!((l.matched as u64) < n);
        let metrics = d.http_get("/metrics").unwrap();
        assert!(
            metrics.contains("kvbm_checksum_failures_total"),
            "{metrics}"
        );
    });
}

/// Every file under `dir`, recursively, with its bytes (what cannot be
/// read, a socket, is skipped).
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else if let Ok(b) = std::fs::read(&p) {
            out.push((p, b));
        }
    }
    out
}

/// A keyed, compressing G3 (`--disk-key-file`, `disk_compression`): its
/// blocks come back bit-exact after `kill -9` and a restart, and nothing
/// under the data dir — the G3 file, the RocksDB catalog — holds a block's
/// bytes or token ids in the clear. Under another key the daemon serves
/// none of them.
#[test]
fn a_keyed_disk_tier_serves_after_restart_and_keeps_no_prompt_in_the_clear() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let file = |name: &str, content: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p.display().to_string()
    };
    let key_a = file("a.key", format!("{}\n", "5a".repeat(32)).as_bytes());
    let key_b = file("b.key", &[0xa5; 32]);
    let conf = file("kvbm.toml", b"disk_compression = \"lz4\"\n");
    let args = |key: &str| -> Vec<String> {
        [
            "--config",
            &conf,
            "--disk-key-file",
            key,
            "--host-bytes",
            "4MiB",
            "--disk-bytes",
            "64MiB",
            "--region-bytes",
            "1MiB",
        ]
        .map(str::to_string)
        .to_vec()
    };
    let start = |key: &str| {
        let a = args(key);
        Kvbm::start(&data_dir, &a.iter().map(String::as_str).collect::<Vec<_>>()).unwrap()
    };
    const MARKER: &[u8] = b"PROMPT-SECRET-42";
    let len = 64 * KIB;
    let n = 32u64;
    // Compressible, recognisable blocks: the marker every 64 bytes, and
    // each 256 bytes followed by a copy of themselves (lz4 about halves it).
    let block = |i: u64| {
        let mut v = data(i, len);
        for chunk in v.chunks_mut(64) {
            chunk[..16].copy_from_slice(MARKER);
        }
        for c in (256..len).step_by(512) {
            v.copy_within(c - 256..c, c);
        }
        v
    };
    let tokens =
        |i: u64| -> Vec<u32> { (0..16).map(|t| 0x5eed_0000 + (i * 16 + t) as u32).collect() };
    let d = start(&key_a);
    let rt = rt();
    rt.block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        c.register_namespace("m", len as u64).await.unwrap();
        for i in 0..n {
            c.rpc()
                .put(v1::PutRequest {
                    namespace: "m".into(),
                    block: Some(v1::BlockMeta {
                        key: key(i),
                        parent: if i == 0 { vec![] } else { key(i - 1) },
                        token_ids: tokens(i),
                    }),
                    data: block(i),
                })
                .await
                .unwrap();
        }
        assert_eq!(c.sync().await.unwrap(), n);
        // Written compressed: the tier holds less than the blocks' bytes.
        let s = stats(&c).await;
        assert!(
            s[&DISK].used_bytes < n * len as u64 * 3 / 4,
            "{:?}",
            s[&DISK]
        );
    });
    d.kill9();
    let d = start(&key_a);
    rt.block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        for i in 0..n {
            assert!(get(&c, "m", i).await.unwrap() == block(i), "block {i}");
        }
        let s = stats(&c).await;
        assert_eq!(s[&DISK].checksum_failures, 0);
        assert_eq!(s[&DISK].hits, n, "every block from G3");
    });
    // A clean stop flushes RocksDB's memtables into its table files.
    assert!(d.stop().unwrap().success());
    let files = files_under(&data_dir);
    assert!(files.iter().any(|(p, _)| p.ends_with("g3.dat")));
    assert!(files
        .iter()
        .any(|(p, _)| p.to_string_lossy().contains("catalog")));
    for (p, bytes) in &files {
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(!has(MARKER), "{}: block bytes in the clear", p.display());
        for i in 0..n {
            let run: Vec<u8> = tokens(i).iter().flat_map(|t| t.to_le_bytes()).collect();
            assert!(
                !has(&run),
                "{}: block {i}'s token ids in the clear",
                p.display()
            );
            assert!(
                !has(&block(i)[4096 + 16..4096 + 64]),
                "{}: block {i}",
                p.display()
            );
        }
    }
    // Another key: the catalog's records do not open, the entries are not
    // its: every block is a miss, none an error.
    let d = start(&key_b);
    rt.block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        let l = c.lookup("m", (0..n).map(key).collect()).await.unwrap();
        assert_eq!(l.matched, 0);
        for i in 0..n {
            let e = get(&c, "m", i).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::NotFound, "block {i}");
        }
    });
}

/// Bad requests get precise status codes and change nothing.
#[test]
fn bad_input_gets_precise_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = Kvbm::start(dir.path(), &["--host-bytes", "4MiB", "--disk-bytes", "0"]).unwrap();
    rt().block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        c.register_namespace("m", 4096).await.unwrap();
        let code = |r: Result<bool, tonic::Status>| r.unwrap_err().code();
        assert_eq!(code(put(&c, "nope", 1, 4096).await), tonic::Code::NotFound);
        assert_eq!(
            code(put(&c, "m", 1, 4000).await),
            tonic::Code::InvalidArgument
        );
        let long_key = c
            .rpc()
            .put(v1::PutRequest {
                namespace: "m".into(),
                block: Some(v1::BlockMeta {
                    key: vec![1; 33],
                    ..Default::default()
                }),
                data: vec![0; 4096],
            })
            .await
            .unwrap_err();
        assert_eq!(long_key.code(), tonic::Code::InvalidArgument);
        let r = c.register_namespace("m", 8192).await.unwrap_err();
        assert!(r.to_string().contains("exists"), "{r}");
        // Full: every slot pinned by a reservation → RESOURCE_EXHAUSTED.
        let pool = {
            let s = d.socket.clone();
            tokio::task::spawn_blocking(move || Pool::attach(&s))
                .await
                .unwrap()
                .unwrap()
        };
        let blocks: Vec<_> = (0..2000)
            .map(|i| v1::BlockMeta {
                key: key(i),
                ..Default::default()
            })
            .collect();
        let full = c
            .rpc()
            .reserve(v1::ReserveRequest {
                session: pool.session(),
                namespace: "m".into(),
                blocks,
            })
            .await
            .unwrap_err();
        assert_eq!(full.code(), tonic::Code::ResourceExhausted);
        // Nothing was left reserved: a normal put still works.
        assert!(put(&c, "m", 5, 4096).await.unwrap());
        assert_eq!(get(&c, "m", 5).await.unwrap(), data(5, 4096));
        let unknown_session = c
            .rpc()
            .acquire(v1::AcquireRequest {
                session: 987_654,
                namespace: "m".into(),
                keys: vec![key(5)],
            })
            .await
            .unwrap_err();
        assert_eq!(unknown_session.code(), tonic::Code::NotFound);
    });
    // An unwritable data dir is a clear start-up error.
    let ro = tempfile::tempdir().unwrap();
    let bad = ro.path().join("file");
    std::fs::write(&bad, b"not a dir").unwrap();
    let out = Command::new(bin("kvbm"))
        .arg("--data-dir")
        .arg(bad.join("sub"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("data dir"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Several clients at once, on the copying and the zero-copy paths.
#[test]
fn concurrent_clients() {
    let dir = tempfile::tempdir().unwrap();
    let d = Kvbm::start(
        dir.path(),
        &[
            "--host-bytes",
            "16MiB",
            "--disk-bytes",
            "64MiB",
            "--region-bytes",
            "1MiB",
        ],
    )
    .unwrap();
    let len = 32 * KIB;
    rt().block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        c.register_namespace("m", len as u64).await.unwrap();
        let mut tasks = Vec::new();
        for t in 0..4u64 {
            let socket = d.socket_str();
            tasks.push(tokio::spawn(async move {
                let c = Client::connect(&socket).await.unwrap();
                for j in 0..60 {
                    // Shared blocks (all tasks) and private ones.
                    let i = if j % 3 == 0 { j } else { 1000 * (t + 1) + j };
                    put(&c, "m", i, len).await.unwrap();
                    assert_eq!(get(&c, "m", i).await.unwrap(), data(i, len));
                }
            }));
        }
        // A zero-copy client alongside.
        let socket = d.socket.clone();
        let zc = tokio::spawn(async move {
            let c = Client::connect(&socket.display().to_string())
                .await
                .unwrap();
            let pool = tokio::task::spawn_blocking(move || Pool::attach(&socket))
                .await
                .unwrap()
                .unwrap();
            for i in 50_000..50_040u64 {
                let slots = c
                    .rpc()
                    .reserve(v1::ReserveRequest {
                        session: pool.session(),
                        namespace: "m".into(),
                        blocks: vec![v1::BlockMeta {
                            key: key(i),
                            ..Default::default()
                        }],
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .slots;
                let s = &slots[0];
                pool.slot_mut(s.offset, s.length)
                    .unwrap()
                    .copy_from_slice(&data(i, len));
                c.rpc()
                    .commit(v1::CommitRequest {
                        session: pool.session(),
                        namespace: "m".into(),
                        keys: vec![key(i)],
                    })
                    .await
                    .unwrap();
                let r = c
                    .rpc()
                    .acquire(v1::AcquireRequest {
                        session: pool.session(),
                        namespace: "m".into(),
                        keys: vec![key(i)],
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let s = &r.slots[0];
                assert_eq!(pool.slot(s.offset, s.length).unwrap(), &data(i, len)[..]);
                c.rpc()
                    .release(v1::ReleaseRequest {
                        session: pool.session(),
                        lease: r.lease,
                    })
                    .await
                    .unwrap();
            }
        });
        for t in tasks {
            t.await.unwrap();
        }
        zc.await.unwrap();
    });
}

/// When this variable is set, `crashed_client_leases_are_released` runs as
/// the child that takes a lease and waits to be killed.
const CHILD_ENV: &str = "KVTIER_TEST_LEASE_CHILD";

#[test]
fn crashed_client_leases_are_released() {
    if let Ok(socket) = std::env::var(CHILD_ENV) {
        // Child: lease every block, say so, then hang until killed.
        rt().block_on(async {
            let c = Client::connect(&socket).await.unwrap();
            let s = std::path::PathBuf::from(&socket);
            let pool = tokio::task::spawn_blocking(move || Pool::attach(&s))
                .await
                .unwrap()
                .unwrap();
            let r = c
                .rpc()
                .acquire(v1::AcquireRequest {
                    session: pool.session(),
                    namespace: "m".into(),
                    keys: (0..8).map(key).collect(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.slots.len(), 8);
            println!("LEASED");
            tokio::time::sleep(Duration::from_secs(600)).await;
        });
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = Kvbm::start(
        dir.path(),
        &[
            "--host-bytes",
            "2MiB",
            "--disk-bytes",
            "0",
            "--lease-ttl-secs",
            "2",
        ],
    )
    .unwrap();
    let len = 128 * KIB; // 16 blocks fill the pool
    let rt = rt();
    rt.block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        c.register_namespace("m", len as u64).await.unwrap();
        for i in 0..8 {
            put(&c, "m", i, len).await.unwrap();
        }
    });
    // Puts 16 new blocks (a pool's worth), then says how many of the
    // first 8 blocks are still in host memory.
    let churn = |c: Client, from: u64| async move {
        for i in from..from + 16 {
            put(&c, "m", i, len).await.unwrap();
        }
        c.lookup("m", (0..8).map(key).collect())
            .await
            .unwrap()
            .matched
    };

    // 1. A client process killed -9 while holding a lease.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crashed_client_leases_are_released",
            "--nocapture",
        ])
        .env(CHILD_ENV, d.socket_str())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(out));
    assert!(lines.any(|l| l.map(|l| l.contains("LEASED")).unwrap_or(false)));
    rt.block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        // While the lease is held, the leased blocks are never evicted.
        assert_eq!(churn(c.clone(), 100).await, 8, "leased blocks stay");
    });
    child.kill().unwrap();
    child.wait().unwrap();
    drop(lines);
    std::thread::sleep(Duration::from_millis(300));
    rt.block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        assert_eq!(churn(c.clone(), 200).await, 0, "leases released on crash");
        // 2. A hung client (connection open, never releases): the TTL ends it.
        for i in 0..8 {
            put(&c, "m", i, len).await.unwrap();
        }
        let s = d.socket.clone();
        let pool = tokio::task::spawn_blocking(move || Pool::attach(&s))
            .await
            .unwrap()
            .unwrap();
        let r = c
            .rpc()
            .acquire(v1::AcquireRequest {
                session: pool.session(),
                namespace: "m".into(),
                keys: (0..8).map(key).collect(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.slots.len(), 8);
        assert_eq!(churn(c.clone(), 300).await, 8, "leased blocks stay");
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(churn(c.clone(), 400).await, 0, "expired lease released");
        drop(pool);
    });
}

/// A full file system: the disk tier degrades, the host tier keeps serving,
/// and what was stored stays intact.
#[test]
fn disk_full_degrades_but_serves_host() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=12m", "tmpfs"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root and must be able to mount a tmpfs"
        );
        eprintln!("skipping: cannot mount a tmpfs (not root)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    // The disk tier's file on the small file system, the catalog elsewhere.
    let disk_file = mnt.join("g3.dat");
    let disk_file = disk_file.to_str().unwrap();
    let d = Kvbm::start(
        &dir.path().join("kvbm"),
        &[
            "--host-bytes",
            "8MiB",
            "--disk-bytes",
            "64MiB",
            "--region-bytes",
            "1MiB",
            "--disk-path",
            disk_file,
        ],
    )
    .unwrap();
    let len = 256 * KIB;
    rt().block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        c.register_namespace("m", len as u64).await.unwrap();
        let mut degraded = false;
        let mut i = 0u64;
        while i < 200 {
            put(&c, "m", i, len).await.unwrap();
            if i % 4 == 3 {
                c.sync().await.ok();
                let s = stats(&c).await;
                if s[&DISK].degraded {
                    degraded = true;
                    break;
                }
            }
            i += 1;
        }
        assert!(degraded, "12 MiB file system filled without degrading");
        let health = d.http_get("/healthz").unwrap();
        assert!(health.contains("degraded"), "{health}");
        // Still serving: new puts land in host memory and come back.
        for j in 1000..1010 {
            put(&c, "m", j, len).await.unwrap();
            assert_eq!(get(&c, "m", j).await.unwrap(), data(j, len));
        }
        // Blocks that reached the disk before it filled are intact.
        let mut served = 0;
        for j in 0..i {
            if let Ok(b) = get(&c, "m", j).await {
                assert_eq!(b, data(j, len), "block {j}");
                served += 1;
            }
        }
        assert!(served > 0);
    });
}

/// The pool socket's binary Lookup answers as gRPC does, survives malformed
/// bodies, and drops (only) a connection whose framing it cannot trust.
#[test]
fn pool_socket_lookup_fast_path() {
    use kvtier_client::Session;
    use std::io::{Read, Write};

    let dir = tempfile::tempdir().unwrap();
    let d = Kvbm::start(dir.path(), &["--host-bytes", "4MiB", "--disk-bytes", "0"]).unwrap();
    let keys: Vec<Vec<u8>> = (0..12).map(key).collect();
    let grpc = rt().block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        c.register_namespace("m", 4096).await.unwrap();
        for i in 0..10 {
            assert!(put(&c, "m", i, 4096).await.unwrap());
        }
        c.lookup("m", keys.clone()).await.unwrap()
    });
    assert_eq!(grpc.matched, 10);

    let mut s = Session::connect(&d.socket, Some(Duration::from_secs(5))).unwrap();
    let fast = s.lookup("m", keys.iter().map(|k| &k[..])).unwrap();
    assert_eq!(
        (fast.matched, fast.host, fast.disk, fast.local),
        (10, 10, 0, 10)
    );
    // A chain that starts with an absent key matches nothing.
    let fast = s.lookup("m", keys[11..].iter().map(|k| &k[..])).unwrap();
    assert_eq!(fast.matched, 0);
    // Daemon-side errors carry gRPC's codes, and the session goes on.
    let status = |e: kvtier_client::Error| match e {
        kvtier_client::Error::Status(s) => s.code(),
        other => panic!("not a status: {other}"),
    };
    let e = s.lookup("nope", keys.iter().map(|k| &k[..])).unwrap_err();
    assert_eq!(status(e), tonic::Code::NotFound);
    let long = [vec![7u8; 33]];
    let e = s.lookup("m", long.iter().map(|k| &k[..])).unwrap_err();
    assert_eq!(status(e), tonic::Code::InvalidArgument);
    assert_eq!(
        s.lookup("m", keys.iter().map(|k| &k[..])).unwrap().matched,
        10
    );

    // Raw frames: a body that lies about its key count gets an error reply
    // and the connection stays usable.
    let raw = || {
        let mut c =
            std::os::unix::net::UnixStream::connect(kvtier_client::pool_socket_path(&d.socket))
                .unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut handshake = [0u8; 16];
        c.read_exact(&mut handshake).unwrap();
        c
    };
    let reply = |c: &mut std::os::unix::net::UnixStream| -> Option<(u8, Vec<u8>)> {
        let mut h = [0u8; 5];
        c.read_exact(&mut h).ok()?;
        let len = u32::from_le_bytes(h[..4].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len - 1];
        c.read_exact(&mut body).ok()?;
        Some((h[4], body))
    };
    let mut c = raw();
    let mut frame = Vec::new();
    kvtier_proto::session::encode_lookup(&mut frame, "m", keys.iter().map(|k| &k[..])).unwrap();
    let mut lying = frame.clone();
    lying[5 + 2 + 1 + 1] = 200; // count's low byte: 200 keys announced, 12 sent
    c.write_all(&lying).unwrap();
    let (kind, body) = reply(&mut c).unwrap();
    assert_eq!(kind, 3, "{}", String::from_utf8_lossy(&body));
    c.write_all(&frame).unwrap();
    assert_eq!(reply(&mut c).unwrap().0, 0);
    // An oversized header or an unknown op: an error reply, then the
    // connection is closed (its framing can no longer be trusted).
    for bad in [
        [0xff, 0xff, 0xff, 0x7f, 1].to_vec(),
        [1, 0, 0, 0, 99].to_vec(),
    ] {
        let mut c = raw();
        c.write_all(&bad).unwrap();
        assert_eq!(reply(&mut c).unwrap().0, 3);
        let mut rest = Vec::new();
        assert_eq!(c.read_to_end(&mut rest).unwrap(), 0);
    }
    // A client that hangs up mid-frame costs nothing; others go on.
    {
        let mut c = raw();
        c.write_all(&frame[..frame.len() / 2]).unwrap();
    }
    assert_eq!(
        s.lookup("m", keys.iter().map(|k| &k[..])).unwrap().matched,
        10
    );
    let health = d.http_get("/healthz").unwrap();
    assert!(health.contains("ok"), "{health}");

    // A key twice in one Reserve batch gets one slot (the second grant is
    // empty), and committing it makes one block.
    let pool = Pool::attach(&d.socket).unwrap();
    rt().block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        let meta = |i| v1::BlockMeta {
            key: key(i),
            parent: key(i - 1),
            token_ids: vec![],
        };
        let grants = c
            .rpc()
            .reserve(v1::ReserveRequest {
                session: pool.session(),
                namespace: "m".into(),
                blocks: vec![meta(10), meta(10)],
            })
            .await
            .unwrap()
            .into_inner()
            .slots;
        assert_eq!(grants.len(), 2);
        assert_eq!((grants[0].length, grants[1].length), (4096, 0));
        let committed = c
            .rpc()
            .commit(v1::CommitRequest {
                session: pool.session(),
                namespace: "m".into(),
                keys: vec![key(10), key(10)],
            })
            .await
            .unwrap()
            .into_inner()
            .committed;
        assert_eq!(committed, 1);
    });
    assert_eq!(
        s.lookup("m", keys.iter().map(|k| &k[..])).unwrap().matched,
        11
    );

    // The offload path over the pool's own session: reserve, write, commit;
    // reserve and abort; refusals leave the session usable.
    let (k11, k12, k13) = (key(11), key(12), key(13));
    let tokens: Vec<u32> = (0..32).collect();
    let grants = pool
        .reserve(
            "m",
            [&k11[..], &k12[..]].into_iter(),
            [&key(10)[..], &k11[..]].into_iter(),
            &tokens,
            16,
        )
        .unwrap();
    assert!(grants.iter().all(|&(_, len)| len == 4096), "{grants:?}");
    for (i, &(off, len)) in grants.iter().enumerate() {
        pool.slot_mut(off, len)
            .unwrap()
            .copy_from_slice(&data(11 + i as u64, 4096));
    }
    assert_eq!(
        pool.commit("m", [&k11[..], &k12[..]].into_iter()).unwrap(),
        2
    );
    let chain: Vec<Vec<u8>> = (0..14).map(key).collect();
    assert_eq!(
        s.lookup("m", chain.iter().map(|k| &k[..])).unwrap().matched,
        13
    );
    rt().block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        assert_eq!(get(&c, "m", 12).await.unwrap(), data(12, 4096));
    });
    pool.reserve("m", [&k13[..]].into_iter(), [&k12[..]].into_iter(), &[], 16)
        .unwrap();
    assert_eq!(pool.abort("m", [&k13[..]].into_iter()).unwrap(), 1);
    assert_eq!(
        s.lookup("m", chain.iter().map(|k| &k[..])).unwrap().matched,
        13
    );
    let code = |e: kvtier_client::Error| match e {
        kvtier_client::Error::Status(s) => s.code(),
        other => panic!("not a status: {other}"),
    };
    let bad_tokens = pool
        .reserve(
            "m",
            [&k13[..]].into_iter(),
            [&k12[..]].into_iter(),
            &tokens,
            16,
        )
        .unwrap_err();
    assert_eq!(code(bad_tokens), tonic::Code::InvalidArgument);
    let unknown = pool.commit("nope", [&k13[..]].into_iter()).unwrap_err();
    assert_eq!(code(unknown), tonic::Code::NotFound);
    assert!(pool.is_alive());
}

/// `sync` tells the truth about durability. Blocks committed 64 at a time
/// overrun a write queue of 2: `sync` reports the dropped ones (counted
/// once), every block it does not report survives `kill -9`, and
/// `--retry-dropped` writes them all (back-pressure instead of drops).
#[test]
fn sync_reports_dropped_writes_and_retries_them() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("kvbm.toml");
    std::fs::write(&conf, "write_queue = 2\n").unwrap();
    let args = [
        "--host-bytes",
        "64MiB",
        "--disk-bytes",
        "128MiB",
        "--region-bytes",
        "4MiB",
        "--config",
        conf.to_str().unwrap(),
    ];
    let len = 64 * KIB;
    let n = 512u64; // 32 MiB: all of it stays in host memory
    let d = Kvbm::start(dir.path(), &args).unwrap();
    let rt = rt();
    let commit_all = |pool: &Pool, range: std::ops::Range<u64>| {
        let keys: Vec<Vec<u8>> = range.clone().map(key).collect();
        for chunk in keys.chunks(64) {
            let none: Vec<&[u8]> = chunk.iter().map(|_| &[][..]).collect();
            let slots = pool
                .reserve("m", chunk.iter().map(|k| &k[..]), none.into_iter(), &[], 0)
                .unwrap();
            for (k, (off, l)) in chunk.iter().zip(slots) {
                let i = u64::from_be_bytes(k[1..].try_into().unwrap());
                pool.slot_mut(off, l)
                    .unwrap()
                    .copy_from_slice(&data(i, len));
            }
            pool.commit("m", chunk.iter().map(|k| &k[..])).unwrap();
        }
    };
    let first = rt.block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        c.register_namespace("m", len as u64).await.unwrap();
        let pool = Pool::attach(&d.socket).unwrap();
        commit_all(&pool, 0..n);
        let list = v1::SyncRequest {
            list_not_durable: true,
            ..Default::default()
        };
        let r = c.sync_report(list).await.unwrap();
        assert!(r.not_durable > 0, "a queue of 2 drops some of 64 at once");
        assert_eq!(r.durable_blocks + r.not_durable, n, "{r:?}");
        assert_eq!(r.not_durable_blocks.len() as u64, r.not_durable);
        assert_eq!(r.lost, 0, "nothing left host memory");
        let s = stats(&c).await;
        assert_eq!(s[&DISK].dropped_writes, r.not_durable, "counted once");
        let dropped: std::collections::HashSet<Vec<u8>> =
            r.not_durable_blocks.into_iter().map(|b| b.key).collect();
        // More blocks, then retry: everything still in host memory is
        // written, waiting for queue room.
        commit_all(&pool, n..2 * n);
        let retry = v1::SyncRequest {
            retry_dropped: true,
            list_not_durable: true,
        };
        let r = c.sync_report(retry).await.unwrap();
        assert_eq!((r.durable_blocks, r.not_durable), (2 * n, 0), "{r:?}");
        dropped
    });
    assert!(!first.is_empty());
    d.kill9();
    let d = Kvbm::start(dir.path(), &args).unwrap();
    rt.block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        for i in 0..2 * n {
            assert_eq!(get(&c, "m", i).await.unwrap(), data(i, len), "block {i}");
        }
    });
}

/// Host eviction is least recently used for real: 8 blocks read after every
/// put of a new one stay in a 64-slot pool while 300 others cycle through
/// (reading a block used to put it at the victim end).
#[test]
fn blocks_read_stay_in_host_memory() {
    let dir = tempfile::tempdir().unwrap();
    let len = 64 * KIB;
    let d = Kvbm::start(dir.path(), &["--host-bytes", "4MiB", "--disk-bytes", "0"]).unwrap();
    rt().block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        c.register_namespace("m", len as u64).await.unwrap();
        let hot = 1_000_000u64;
        for h in hot..hot + 8 {
            put(&c, "m", h, len).await.unwrap();
        }
        for cold in 0..300 {
            put(&c, "m", cold, len).await.unwrap();
            for h in hot..hot + 8 {
                let got = get(&c, "m", h).await;
                assert_eq!(
                    got.ok(),
                    Some(data(h, len)),
                    "hot block {h} after cold {cold}"
                );
            }
        }
        let s = stats(&c).await;
        assert_eq!(s[&HOST].hits, 300 * 8);
        assert!(s[&HOST].evictions >= 300 + 8 - 64, "the cold blocks cycled");
    });
}

/// A damaged catalog never stops the daemon: it starts cold, and the
/// damaged files stay for inspection (no crash loop under systemd).
#[test]
fn damaged_catalog_starts_cold_and_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--host-bytes",
        "4MiB",
        "--disk-bytes",
        "16MiB",
        "--region-bytes",
        "1MiB",
    ];
    let len = 64 * KIB;
    let d = Kvbm::start(dir.path(), &args).unwrap();
    rt().block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        c.register_namespace("m", len as u64).await.unwrap();
        for i in 0..8 {
            put(&c, "m", i, len).await.unwrap();
        }
        assert_eq!(c.sync().await.unwrap(), 8);
    });
    assert!(d.stop().unwrap().success());
    std::fs::write(dir.path().join("catalog/CURRENT"), b"\xffgarbage\n").unwrap();
    let d = Kvbm::start(dir.path(), &args).expect("starts despite the damage");
    rt().block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        assert!(get(&c, "m", 0).await.is_err(), "cold: nothing recovered");
        // Usable: a namespace and blocks again.
        c.register_namespace("m", len as u64).await.unwrap();
        put(&c, "m", 0, len).await.unwrap();
        assert_eq!(get(&c, "m", 0).await.unwrap(), data(0, len));
    });
    let kept: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("catalog.damaged-")
        })
        .collect();
    assert_eq!(kept.len(), 1, "the damaged catalog is kept");
    assert!(kept[0].path().join("CURRENT").exists());
}
