//! Tenants against the real daemon: two tenants (by token on TCP, by Unix
//! user on the sockets) and the operator. A tenant can neither look up,
//! read, write nor evict another's blocks, nor learn its namespaces, nor see
//! its bytes in the pool it maps; each fills only its own host pool and
//! disk quota.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use futures::StreamExt;
use kvtier_client::{v1, Client, Credentials, Pool};
use kvtier_e2e::{bin, rt, Kvbm};

const BLOCK: usize = 4096;
const UID_A: u32 = 61001;
const UID_B: u32 = 61002;
const GID: u32 = 61000;

fn key(i: u64) -> Vec<u8> {
    format!("tenant-{i}").into_bytes()
}

async fn put(c: &Client, ns: &str, i: u64, byte: u8) -> Result<bool, tonic::Status> {
    Ok(c.rpc()
        .put(v1::PutRequest {
            namespace: ns.into(),
            block: Some(v1::BlockMeta {
                key: key(i),
                ..Default::default()
            }),
            data: vec![byte; BLOCK],
        })
        .await?
        .into_inner()
        .stored)
}

async fn get(c: &Client, ns: &str, i: u64) -> Result<(Vec<u8>, i32), tonic::Status> {
    let r = c
        .rpc()
        .get(v1::GetRequest {
            namespace: ns.into(),
            key: key(i),
        })
        .await?
        .into_inner();
    Ok((r.data, r.served_from))
}

async fn names(c: &Client) -> Vec<String> {
    let mut v: Vec<String> = c
        .rpc()
        .list_namespaces(v1::ListNamespacesRequest {})
        .await
        .unwrap()
        .into_inner()
        .namespaces
        .into_iter()
        .map(|n| n.name)
        .collect();
    v.sort();
    v
}

/// Where each of `keys` is, one lookup per key (the blocks are no chain).
async fn tiers(c: &Client, ns: &str, keys: impl Iterator<Item = u64>) -> (usize, usize) {
    let (mut host, mut disk) = (0, 0);
    for i in keys {
        let r = c
            .rpc()
            .lookup(v1::LookupRequest {
                namespace: ns.into(),
                keys: vec![key(i)],
            })
            .await
            .unwrap()
            .into_inner();
        for t in r.tiers {
            match v1::Tier::try_from(t.tier) {
                Ok(v1::Tier::Host) => host += t.blocks as usize,
                Ok(v1::Tier::Disk) => disk += t.blocks as usize,
                _ => {}
            }
        }
    }
    (host, disk)
}

/// Starts kvbm with tenants `a` (user `UID_A`, token `a`, a 4 MiB pool, at
/// most 1 MiB on disk) and `b` (user `UID_B`, token `b`, 4 MiB); the
/// operator's token is `op`. The sockets are in `dir/run`, for group `GID`.
fn start(dir: &Path) -> Kvbm {
    for (name, token) in [("a.token", "a"), ("b.token", "b"), ("op.token", "op")] {
        std::fs::write(dir.join(name), token).unwrap();
    }
    let conf = dir.join("kvbm.toml");
    std::fs::write(
        &conf,
        format!(
            r#"
[[tenants]]
name = "a"
uids = [{UID_A}]
token_file = "{d}/a.token"
host_bytes = "4MiB"
disk_bytes = "1MiB"

[[tenants]]
name = "b"
uids = [{UID_B}]
token_file = "{d}/b.token"
host_bytes = "4MiB"
"#,
            d = dir.display()
        ),
    )
    .unwrap();
    // Tenants' processes must reach the sockets: through the group, and a
    // test directory others may traverse (not list).
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    let socket = dir.join("run/kvbm.sock");
    let (conf, socket, token) = (
        conf.display().to_string(),
        socket.display().to_string(),
        dir.join("op.token").display().to_string(),
    );
    let gid = GID.to_string();
    let mut d = Kvbm::start(
        &dir.join("data"),
        &[
            "--config",
            &conf,
            "--socket",
            &socket,
            "--socket-group",
            &gid,
            "--auth-token-file",
            &token,
            "--host-bytes",
            "8MiB",
            "--disk-bytes",
            "64MiB",
            "--region-bytes",
            "1MiB",
        ],
    )
    .unwrap();
    d.socket = dir.join("run/kvbm.sock");
    d
}

async fn client(d: &Kvbm, dir: &Path, token: Option<&str>) -> Client {
    let creds = Credentials {
        token_file: token.map(|t| dir.join(format!("{t}.token"))),
        ..Credentials::default()
    };
    Client::connect_with(&d.grpc, &creds).await.unwrap()
}

#[test]
fn tenants_never_reach_each_others_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path());
    let rt = rt();
    rt.block_on(async {
        let dir = dir.path();
        let a = client(&d, dir, Some("a")).await;
        let b = client(&d, dir, Some("b")).await;
        let op = client(&d, dir, Some("op")).await;
        let nobody = client(&d, dir, None).await;
        let refused = nobody.rpc().stats(v1::StatsRequest {}).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);

        // Each tenant subscribes to events from the start.
        let mut b_events = b
            .rpc()
            .subscribe_events(v1::SubscribeEventsRequest::default())
            .await
            .unwrap()
            .into_inner();

        a.register_namespace("m", BLOCK as u64).await.unwrap();
        for i in 0..8 {
            assert!(put(&a, "m", i, 0xaa).await.unwrap());
        }
        // b knows of no namespace, cannot name a's, and a's name is its own.
        assert!(names(&b).await.is_empty());
        assert_eq!(
            get(&b, "m", 0).await.unwrap_err().code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            get(&b, "a::m", 0).await.unwrap_err().code(),
            tonic::Code::NotFound
        );
        b.register_namespace("m", BLOCK as u64).await.unwrap();
        assert_eq!(tiers(&b, "m", 0..8).await, (0, 0), "b sees a's blocks");
        assert_eq!(
            get(&b, "m", 0).await.unwrap_err().code(),
            tonic::Code::NotFound
        );
        // b evicts and clears everything it can: a keeps its blocks.
        let evicted = b
            .rpc()
            .evict(v1::EvictRequest {
                namespace: "m".into(),
                keys: (0..8).map(key).collect(),
            })
            .await
            .unwrap()
            .into_inner()
            .evicted;
        assert_eq!(evicted, 0);
        b.rpc().clear(v1::ClearRequest::default()).await.unwrap();
        // b writes the same keys: its own blocks, a's stay a's.
        for i in 0..8 {
            assert!(put(&b, "m", i, 0xbb).await.unwrap());
        }
        for i in 0..8 {
            assert_eq!(get(&a, "m", i).await.unwrap().0, vec![0xaa; BLOCK]);
            assert_eq!(get(&b, "m", i).await.unwrap().0, vec![0xbb; BLOCK]);
        }
        assert_eq!(names(&a).await, ["m"]);
        assert_eq!(names(&b).await, ["m"]);
        // The operator sees both under their full names.
        assert_eq!(names(&op).await, ["a::m", "b::m"]);
        assert_eq!(get(&op, "a::m", 0).await.unwrap().0, vec![0xaa; BLOCK]);

        // b's events name only its own namespace, as b knows it.
        let mut seen = HashSet::new();
        while seen.len() < 8 {
            let batch = tokio::time::timeout(std::time::Duration::from_secs(10), b_events.next())
                .await
                .expect("b's events")
                .unwrap()
                .unwrap();
            for e in batch.events {
                if let Some(v1::event::Kind::Stored(s)) = e.kind {
                    assert_eq!(s.namespace, "m", "b got another tenant's event");
                    seen.extend(s.keys);
                }
            }
        }

        // a fills its own 4 MiB pool (1024 slots) twice over: it evicts
        // its own blocks, never b's, and keeps at most its 1 MiB (256
        // blocks) on disk.
        for i in 100..2148 {
            put(&a, "m", i, 0xaa).await.unwrap();
        }
        op.rpc().sync(v1::SyncRequest::default()).await.unwrap();
        assert_eq!(tiers(&b, "m", 0..8).await.0, 8, "a evicted b's blocks");
        let (a_host, a_disk) = tiers(&a, "m", (0..8).chain(100..2148)).await;
        assert!(
            a_host <= 1024,
            "a holds {a_host} blocks in a 1024-slot pool"
        );
        assert!(a_disk <= 256, "a holds {a_disk} blocks on disk, quota 256");
        assert!(a_disk > 0, "a's blocks never reached the disk");
    });

    // On the Unix sockets, by user: each tenant maps its own pool only.
    // Running processes as other users needs root.
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the pool-socket part needs root: not run");
        return;
    }
    for (uid, role) in [(UID_A, "a"), (UID_B, "b")] {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tenant_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("KVTIER_TENANT_SOCKET", d.socket_str())
            .env("KVTIER_TENANT_ROLE", role)
            .uid(uid)
            .gid(GID)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "tenant {role}: {text}");
        assert!(text.contains(&format!("tenant {role} ok")), "{text}");
    }
    rt.block_on(async {
        let op = client(&d, dir.path(), Some("op")).await;
        assert_eq!(get(&op, "a::p", 5).await.unwrap().0, vec![0xa5; BLOCK]);
        assert_eq!(get(&op, "b::p", 5).await.unwrap().0, vec![0xb5; BLOCK]);
        assert_eq!(get(&op, "b::m", 0).await.unwrap().0, vec![0xbb; BLOCK]);
    });
}

/// A tenant's client, run as the tenant's user by
/// `tenants_never_reach_each_others_blocks`. Does nothing when run on its
/// own.
#[test]
fn tenant_process() {
    let (Ok(socket), Ok(role)) = (
        std::env::var("KVTIER_TENANT_SOCKET"),
        std::env::var("KVTIER_TENANT_ROLE"),
    ) else {
        return;
    };
    let pool = Pool::attach(socket.as_ref()).unwrap();
    // The tenant's own 4 MiB pool, not the 8 MiB shared one.
    assert_eq!(pool.len(), 4 << 20);
    let whole = pool.slot(0, pool.len() as u64).unwrap();
    match role.as_str() {
        // a's pool holds a's blocks.
        "a" => assert!(whole.contains(&0xaa)),
        // b's pool never held a byte of a's.
        _ => assert!(!whole.contains(&0xaa), "a's bytes in b's pool"),
    }
    let mut lookup = kvtier_client::Session::connect(socket.as_ref(), None).unwrap();
    // A block of its own that is still there (a evicted its oldest ones).
    let k = key(if role == "a" { 2147 } else { 0 });
    let found = lookup.lookup("m", [k.as_slice()].into_iter()).unwrap();
    assert_eq!(found.matched, 1, "its own block of m");
    // A new namespace on the pool socket, written through its mapping.
    rt().block_on(async {
        let c = Client::connect(&socket).await.unwrap();
        c.register_namespace("p", BLOCK as u64).await.unwrap();
        let names = names(&c).await;
        assert_eq!(names, ["m", "p"], "tenant {role} sees {names:?}");
    });
    let byte = if role == "a" { 0xa5 } else { 0xb5 };
    let k = key(5);
    let slots = pool
        .reserve(
            "p",
            [k.as_slice()].into_iter(),
            [&[][..]].into_iter(),
            &[],
            0,
        )
        .unwrap();
    let (off, len) = slots[0];
    assert_eq!(len, BLOCK as u64);
    pool.slot_mut(off, len).unwrap().fill(byte);
    assert_eq!(pool.commit("p", [k.as_slice()].into_iter()).unwrap(), 1);
    let mut out = std::io::stdout();
    writeln!(out, "tenant {role} ok").unwrap();
    out.flush().unwrap();
}

#[test]
fn a_bad_tenant_configuration_stops_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("kvbm.toml");
    std::fs::write(
        &conf,
        "[[tenants]]\nname = \"a b\"\nuids = [1]\nhost_bytes = \"4MiB\"\n",
    )
    .unwrap();
    let out = Command::new(bin("kvbm"))
        .arg("--config")
        .arg(&conf)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tenant name"));
}

/// Tenants known by Unix user only, no token at all: a TCP caller could be
/// any tenant's process (the port is on loopback, where tenants run), so it
/// is refused rather than taken for the operator.
#[test]
fn with_tenants_unauthenticated_tcp_is_not_the_operator() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("kvbm.toml");
    std::fs::write(
        &conf,
        format!("[[tenants]]\nname = \"a\"\nuids = [{UID_A}]\nhost_bytes = \"4MiB\"\n"),
    )
    .unwrap();
    let conf = conf.display().to_string();
    let d = Kvbm::start(
        &dir.path().join("data"),
        &[
            "--config",
            &conf,
            "--host-bytes",
            "8MiB",
            "--disk-bytes",
            "0",
        ],
    )
    .unwrap();
    rt().block_on(async {
        let tcp = Client::connect(&d.grpc).await.unwrap();
        let refused = tcp.rpc().stats(v1::StatsRequest {}).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        // The operator still has the Unix socket.
        let uds = Client::connect(&d.socket_str()).await.unwrap();
        uds.rpc().stats(v1::StatsRequest {}).await.unwrap();
    });
}
