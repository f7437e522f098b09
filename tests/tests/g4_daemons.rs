//! The object-store tier (G4) between real kvbm daemons and a real
//! S3-compatible server (Garage): a chain stored on one node is found and
//! served bit-exact by another that never saw it; a dead server costs
//! misses, never errors or hangs, and is used again when it returns; damaged
//! segments are never served; a daemon killed mid-upload comes back with
//! what reached the bucket; a node's share of the bucket stays within its
//! capacity; compressed, encrypted blocks are shared by the nodes holding
//! the key, stored without their plaintext or their token ids, and never
//! listed or served under another key.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kvtier_client::{v1, Client};
use kvtier_e2e::{rt, Garage, Kvbm};
use rand::{RngCore, SeedableRng};

const NS: &str = "g4-test";
const REMOTE: i32 = v1::Tier::Remote as i32;

fn key(i: u64) -> Vec<u8> {
    let mut k = b"g4".to_vec();
    k.extend_from_slice(&i.to_be_bytes());
    k
}

fn data(i: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(i).fill_bytes(&mut v);
    v
}

/// A daemon on bucket prefix `prefix`: endpoint and credentials from the
/// `AWS_*` environment, timing from a TOML file (short linger and poll
/// keep the test quick; deadlines generous for a debug Garage on a loaded
/// CI machine). `extra` are more flags.
fn daemon(g: &Garage, dir: &std::path::Path, prefix: &str, extra: &[&str]) -> Kvbm {
    daemon_toml(g, dir, prefix, "", extra)
}

/// [`daemon`] with more lines for its TOML file.
fn daemon_toml(
    g: &Garage,
    dir: &std::path::Path,
    prefix: &str,
    toml: &str,
    extra: &[&str],
) -> Kvbm {
    std::fs::create_dir_all(dir).unwrap();
    let conf = dir.join("kvbm.toml");
    std::fs::write(
        &conf,
        format!(
            "remote_url = \"s3://kvtier/{prefix}\"\nremote_linger_ms = 100\n\
             remote_poll_ms = 250\nremote_timeout_ms = 3000\n\
             remote_min_bytes_per_s = \"5MiB\"\nremote_segment_bytes = \"1MiB\"\n{toml}"
        ),
    )
    .unwrap();
    let conf = conf.display().to_string();
    let mut args = vec![
        "--config",
        &conf,
        "--host-bytes",
        "64MiB",
        "--disk-bytes",
        "0",
    ];
    args.extend_from_slice(extra);
    Kvbm::start_env(dir, &args, &g.env()).expect("kvbm starts")
}

async fn client(d: &Kvbm) -> Client {
    let c = Client::connect(&d.socket_str()).await.expect("connect");
    c.register_namespace(NS, BLOCK as u64)
        .await
        .expect("namespace");
    c
}

const BLOCK: usize = 64 << 10;

async fn put(c: &Client, i: u64) {
    c.rpc()
        .put(v1::PutRequest {
            namespace: NS.into(),
            block: Some(v1::BlockMeta {
                key: key(i),
                parent: if i == 0 { vec![] } else { key(i - 1) },
                token_ids: (0..16).map(|t| (i * 16 + t) as u32).collect(),
            }),
            data: data(i, BLOCK),
        })
        .await
        .expect("put");
}

async fn get(c: &Client, i: u64) -> Result<(Vec<u8>, i32), tonic::Status> {
    let r = c
        .rpc()
        .get(v1::GetRequest {
            namespace: NS.into(),
            key: key(i),
        })
        .await?
        .into_inner();
    Ok((r.data, r.served_from))
}

async fn lookup(c: &Client, range: std::ops::Range<u64>) -> v1::LookupResponse {
    c.lookup(NS, range.map(key).collect())
        .await
        .expect("lookup")
}

async fn remote_stats(c: &Client) -> v1::TierStats {
    let tiers: HashMap<i32, v1::TierStats> = c
        .stats()
        .await
        .expect("stats")
        .tiers
        .into_iter()
        .map(|t| (t.tier, t))
        .collect();
    tiers.get(&REMOTE).cloned().expect("a remote tier line")
}

/// Polls `cond` until it holds or `limit` passes; returns the time taken.
async fn within<F, Fut>(limit: Duration, what: &str, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    while !cond().await {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.elapsed()
}

/// A stores the chain `0..n`; returns how long B took to find it all in
/// the bucket.
async fn store_and_find(ca: &Client, cb: &Client, n: u64) -> Duration {
    for i in 0..n {
        put(ca, i).await;
    }
    // The issue asks for 2 s; a debug Garage on a loaded machine gets more.
    within(Duration::from_secs(15), "B finds A's chain", || async {
        lookup(cb, 0..n).await.matched == n as u32
    })
    .await
}

#[test]
fn a_chain_stored_on_one_node_is_served_bit_exact_by_another() {
    let Some(g) = Garage::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let a = daemon(&g, &dir.path().join("a"), "fleet", &["--remote-admit", "1"]);
    let b = daemon(&g, &dir.path().join("b"), "fleet", &[]);
    rt().block_on(async {
        let (ca, cb) = (client(&a).await, client(&b).await);
        // B never saw the chain: its catalog learns it from the bucket.
        let took = store_and_find(&ca, &cb, 8).await;
        eprintln!("B found A's chain {took:?} after the last put");
        let l = lookup(&cb, 0..8).await;
        assert!(l.locations.iter().all(|&t| t == REMOTE), "{l:?}");
        // The whole chain comes back bit-exact, promoted into B's host pool
        // by the first read of it.
        for i in 0..8 {
            let (d, tier) = get(&cb, i).await.expect("get from G4");
            assert_eq!(d, data(i, BLOCK), "block {i}");
            if i == 0 {
                assert_eq!(tier, REMOTE);
            }
        }
        let l = lookup(&cb, 0..8).await;
        assert_eq!(l.locations[0], v1::Tier::Host as i32, "promoted: {l:?}");
        let s = remote_stats(&cb).await;
        assert!(s.hits >= 1 && s.blocks >= 8, "{s:?}");
        // A block that is nowhere is a miss, on either node.
        assert_eq!(
            get(&cb, 99).await.unwrap_err().code(),
            tonic::Code::NotFound
        );
    });
}

#[test]
fn a_dead_object_store_costs_misses_and_is_used_again_when_it_returns() {
    let Some(mut g) = Garage::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let a = daemon(&g, &dir.path().join("a"), "dead", &["--remote-admit", "1"]);
    let b = daemon(&g, &dir.path().join("b"), "dead", &[]);
    rt().block_on(async {
        let (ca, cb) = (client(&a).await, client(&b).await);
        store_and_find(&ca, &cb, 4).await;
        g.kill9();
        // Lookups never touch the network: as fast as ever.
        let t = Instant::now();
        for _ in 0..100 {
            assert_eq!(lookup(&cb, 0..4).await.matched, 4);
        }
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        // Reads are misses within their deadline, then cost nothing once
        // the breaker opens.
        for i in 0..4 {
            let t = Instant::now();
            let r = get(&cb, i).await;
            assert_eq!(r.unwrap_err().code(), tonic::Code::NotFound);
            assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        }
        within(Duration::from_secs(10), "G4 shows degraded", || async {
            remote_stats(&cb).await.degraded
        })
        .await;
        let health = b.http_get("/healthz").unwrap();
        assert!(health.contains("remote"), "{health}");
        let t = Instant::now();
        assert!(get(&cb, 0).await.is_err());
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        // The host tier keeps serving, uploads are dropped, not waited for.
        put(&cb, 100).await;
        assert_eq!(get(&cb, 100).await.unwrap().0, data(100, BLOCK));
        g.restart();
        // The breaker probes again and the chain is read (its entries were
        // kept: a dead server is not a damaged segment).
        within(Duration::from_secs(60), "B reads G4 again", || async {
            get(&cb, 0).await.is_ok_and(|(d, _)| d == data(0, BLOCK))
        })
        .await;
        assert!(!remote_stats(&cb).await.degraded);
    });
}

/// Every object under `dir` of the bucket's prefix.
async fn objects(
    bucket: &kvbm::remote::bucket::Bucket,
    dir: &str,
) -> Vec<object_store::ObjectMeta> {
    use futures::TryStreamExt;
    bucket
        .store()
        .list(Some(&bucket.path(dir)))
        .try_collect()
        .await
        .unwrap()
}

/// One object's bytes.
async fn object(
    bucket: &kvbm::remote::bucket::Bucket,
    m: &object_store::ObjectMeta,
) -> bytes::Bytes {
    use object_store::ObjectStoreExt;
    bucket
        .store()
        .get(&m.location)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
}

#[test]
fn a_damaged_segment_is_never_served_and_leaves_the_catalog() {
    use object_store::{ObjectStoreExt, PutPayload};
    let Some(g) = Garage::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let a = daemon(&g, &dir.path().join("a"), "bad", &["--remote-admit", "1"]);
    let b = daemon(&g, &dir.path().join("b"), "bad", &[]);
    rt().block_on(async {
        let (ca, cb) = (client(&a).await, client(&b).await);
        store_and_find(&ca, &cb, 4).await;
        // Flip one byte inside block 0's data in every segment.
        let bucket = g.bucket("bad");
        let segs = objects(&bucket, "seg").await;
        assert!(!segs.is_empty());
        for m in segs {
            let mut obj = object(&bucket, &m).await.to_vec();
            obj[4096 + 100] ^= 0x01;
            bucket
                .store()
                .put(&m.location, PutPayload::from(obj))
                .await
                .unwrap();
        }
        assert_eq!(get(&cb, 0).await.unwrap_err().code(), tonic::Code::NotFound);
        let s = remote_stats(&cb).await;
        assert!(s.checksum_failures >= 1, "{s:?}");
        assert!(
            lookup(&cb, 0..4).await.matched < 4,
            "the damaged segment's blocks are forgotten"
        );
    });
}

#[test]
fn a_daemon_killed_during_uploads_comes_back_with_what_reached_the_bucket() {
    let Some(g) = Garage::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let a_dir = dir.path().join("a");
    let a = daemon(&g, &a_dir, "crash", &["--remote-admit", "1"]);
    let b = daemon(&g, &dir.path().join("b"), "crash", &[]);
    let n = 64;
    rt().block_on(async {
        let ca = client(&a).await;
        // The first half reaches the bucket (and A's catalog) ...
        for i in 0..n / 2 {
            put(&ca, i).await;
        }
        within(Duration::from_secs(15), "first half uploaded", || async {
            remote_stats(&ca).await.blocks >= n / 2
        })
        .await;
        // ... the second is being packed and written when A dies.
        for i in n / 2..n {
            put(&ca, i).await;
        }
    });
    a.kill9();
    let a = daemon(&g, &a_dir, "crash", &["--remote-admit", "1"]);
    rt().block_on(async {
        let (ca, cb) = (client(&a).await, client(&b).await);
        // Whatever either node finds is whole and bit-exact.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut served = 0;
        for c in [&ca, &cb] {
            let l = lookup(c, 0..n).await;
            for (i, &t) in l.locations.iter().enumerate() {
                assert_eq!(t, REMOTE);
                let (d, _) = get(c, i as u64).await.expect("found, so served");
                assert_eq!(d, data(i as u64, BLOCK), "block {i}");
                served += 1;
            }
        }
        eprintln!("{served} blocks served after the crash");
        assert!(
            served >= 2 * n / 2,
            "both nodes serve at least the first half"
        );
        // The restarted daemon's catalog came back warm, and it uploads
        // again.
        put(&ca, 1000).await;
        within(Duration::from_secs(15), "upload after restart", || async {
            remote_stats(&ca).await.blocks > 0
        })
        .await;
    });
}

#[test]
fn a_nodes_share_of_the_bucket_stays_within_its_capacity() {
    let Some(g) = Garage::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let a = daemon(
        &g,
        &dir.path().join("a"),
        "cap",
        &["--remote-admit", "1", "--remote-bytes", "3MiB"],
    );
    rt().block_on(async {
        let ca = client(&a).await;
        // 10 MiB of blocks, in segments of about 1 MiB.
        for i in 0..160 {
            put(&ca, i).await;
        }
        within(Duration::from_secs(30), "uploads settle", || async {
            let s = remote_stats(&ca).await;
            s.evictions > 0 && s.used_bytes <= 3 << 20
        })
        .await;
        let s = remote_stats(&ca).await;
        assert!(s.used_bytes <= 3 << 20, "{s:?}");
        // The oldest went first: the newest blocks are still there.
        let l = lookup(&ca, 159..160).await;
        assert_eq!(l.matched, 1);
        let tiers: HashMap<i32, u32> = lookup(&ca, 0..1)
            .await
            .tiers
            .into_iter()
            .map(|t| (t.tier, t.blocks))
            .collect();
        assert_eq!(tiers.get(&REMOTE), Some(&0), "block 0's segment evicted");
    });
}

/// Compressible, distinctive block content: 256-byte runs of random bytes,
/// each followed by a copy of itself (lz4 about halves it; a 64-byte window
/// of one block occurs nowhere else but in that copy).
fn kv(i: u64) -> Vec<u8> {
    let mut v = data(1_000_000 + i, BLOCK);
    for c in (256..BLOCK).step_by(512) {
        v.copy_within(c - 256..c, c);
    }
    v
}

/// Distinctive token ids of block `i` of the encrypted chain: 16 values
/// no other field of a segment is likely to hold.
fn kv_tokens(i: u64) -> Vec<u32> {
    (0..16).map(|t| 0x5eed_0000 + (i * 16 + t) as u32).collect()
}

async fn put_kv(c: &Client, i: u64) {
    c.rpc()
        .put(v1::PutRequest {
            namespace: NS.into(),
            block: Some(v1::BlockMeta {
                key: key(i),
                parent: if i == 0 { vec![] } else { key(i - 1) },
                token_ids: kv_tokens(i),
            }),
            data: kv(i),
        })
        .await
        .expect("put");
}

#[test]
fn encrypted_compressed_blocks_are_shared_under_one_key_and_never_served_under_another() {
    use futures::StreamExt;
    use std::os::unix::fs::PermissionsExt;
    let Some(g) = Garage::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key_file = |name: &str, content: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p.display().to_string()
    };
    // The fleet's key as hex (with a newline), the stranger's as raw bytes.
    let fleet = key_file("fleet.key", format!("{}\n", "5a".repeat(32)).as_bytes());
    let other = key_file("other.key", &[0xa5; 32]);
    let conf = |compression: &str, key: &str| {
        format!("remote_compression = \"{compression}\"\nremote_key_file = \"{key}\"\n")
    };
    let (a_conf, c_conf) = (conf("lz4", &fleet), conf("zstd", &other));
    let a = daemon_toml(
        &g,
        &dir.path().join("a"),
        "sealed",
        &a_conf,
        &["--remote-admit", "1"],
    );
    let b = daemon_toml(&g, &dir.path().join("b"), "sealed", &a_conf, &[]);
    let c = daemon_toml(&g, &dir.path().join("c"), "sealed", &c_conf, &[]);
    let n = 8;
    rt().block_on(async {
        let (ca, cb, cc) = (client(&a).await, client(&b).await, client(&c).await);
        // B's events from the start: its G4 events carry the token ids it
        // opened with the key.
        let mut b_events = cb
            .rpc()
            .subscribe_events(v1::SubscribeEventsRequest::default())
            .await
            .unwrap()
            .into_inner();
        for i in 0..n {
            put_kv(&ca, i).await;
        }
        within(Duration::from_secs(15), "B finds A's chain", || async {
            lookup(&cb, 0..n).await.matched == n as u32
        })
        .await;
        let mut g4_tokens: HashMap<Vec<u8>, Vec<u32>> = HashMap::new();
        while g4_tokens.len() < n as usize {
            let batch = tokio::time::timeout(Duration::from_secs(10), b_events.next())
                .await
                .expect("B's G4 events")
                .unwrap()
                .unwrap();
            for e in batch.events {
                let Some(v1::event::Kind::Stored(s)) = e.kind else {
                    continue;
                };
                if s.tier != REMOTE {
                    continue;
                }
                let per = s.token_ids.len() / s.keys.len();
                for (k, t) in s.keys.iter().zip(s.token_ids.chunks(per)) {
                    g4_tokens.insert(k.clone(), t.to_vec());
                }
            }
        }
        for i in 0..n {
            assert_eq!(
                g4_tokens[&key(i)],
                kv_tokens(i),
                "B's G4 event of block {i}"
            );
        }
        // B, holding the same key, serves the chain bit-exact.
        for i in 0..n {
            let (d, _) = get(&cb, i).await.expect("get from G4 on B");
            assert!(d == kv(i), "block {i} differs");
        }
        // C, under another key, cannot open the blocks' token ids, so it
        // never lists the blocks (several polls after B found them), and
        // serves none: not damage, just not its key's.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(lookup(&cc, 0..n).await.matched, 0, "C lists the chain");
        for i in 0..n {
            let r = get(&cc, i).await;
            assert_eq!(
                r.unwrap_err().code(),
                tonic::Code::NotFound,
                "block {i} on C"
            );
        }
        let s = remote_stats(&cc).await;
        assert_eq!(s.checksum_failures, 0, "{s:?}");
        assert_eq!(lookup(&cc, 0..n).await.matched, 0, "C forgot the chain");
        // The objects are compressed and hold none of the plaintext, nor
        // (segments and index objects) any block's token ids.
        let bucket = g.bucket("sealed");
        let segs = objects(&bucket, "seg").await;
        assert!(!segs.is_empty());
        let token_runs: Vec<Vec<u8>> = (0..n)
            .map(|i| kv_tokens(i).iter().flat_map(|t| t.to_le_bytes()).collect())
            .collect();
        let no_tokens = |name: &str, obj: &[u8]| {
            for (i, run) in token_runs.iter().enumerate() {
                assert!(
                    !obj.windows(run.len()).any(|w| w == &run[..]),
                    "{name}: block {i}'s token ids in the clear"
                );
            }
        };
        let index = objects(&bucket, "idx").await;
        assert!(!index.is_empty());
        for m in index {
            let obj = object(&bucket, &m).await;
            no_tokens(m.location.as_ref(), &obj);
        }
        let mut stored = 0;
        for m in segs {
            let obj = object(&bucket, &m).await;
            stored += obj.len();
            no_tokens(m.location.as_ref(), &obj);
            for i in 0..n {
                let plain = kv(i);
                for at in [0, 4096, BLOCK - 64] {
                    let run = &plain[at..at + 64];
                    assert!(
                        !obj.windows(64).any(|w| w == run),
                        "{}: block {i}'s bytes at {at} in the clear",
                        m.location
                    );
                }
            }
        }
        let raw = n as usize * BLOCK;
        eprintln!("{raw} bytes of blocks stored in {stored} bytes of segments");
        assert!(stored < raw * 3 / 4, "lz4 was used: {stored} of {raw}");
    });
}
