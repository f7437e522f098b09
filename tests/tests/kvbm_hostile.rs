//! kvbm attacked from outside, as a real process: other clients' sessions,
//! the daemon's own session, oversized and half-sent messages, file modes,
//! a second daemon on the same socket, signals. Each test is a finding of a
//! black-box attack (docs/security.md) and failed before its fix.

use std::io::{BufRead, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::time::Duration;

use kvtier_client::{v1, Client, Pool};
use kvtier_e2e::{bin, rt, Kvbm, KVBM_TOKEN};

const BLOCK: usize = 4096;

fn key(i: u64) -> Vec<u8> {
    format!("hostile-{i}").into_bytes()
}

fn meta(i: u64) -> v1::BlockMeta {
    v1::BlockMeta {
        key: key(i),
        ..Default::default()
    }
}

async fn put(c: &Client, i: u64, byte: u8) -> bool {
    c.rpc()
        .put(v1::PutRequest {
            namespace: "m".into(),
            block: Some(meta(i)),
            data: vec![byte; BLOCK],
        })
        .await
        .unwrap()
        .into_inner()
        .stored
}

async fn get(c: &Client, i: u64) -> Result<Vec<u8>, tonic::Status> {
    Ok(c.rpc()
        .get(v1::GetRequest {
            namespace: "m".into(),
            key: key(i),
        })
        .await?
        .into_inner()
        .data)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// The victim of `other_processes_cannot_use_a_session`: a separate process
/// (this test binary run again) holding a pool session with a pending
/// reservation and a lease. It prints them, waits for a line on stdin, then
/// writes its block and commits it. Does nothing when run on its own.
#[test]
fn victim_process() {
    let Ok(socket) = std::env::var("KVTIER_VICTIM_SOCKET") else {
        return;
    };
    let pool = Pool::attach(socket.as_ref()).unwrap();
    let slots = pool
        .reserve(
            "m",
            [key(1).as_slice()].into_iter(),
            [&[][..]].into_iter(),
            &[],
            0,
        )
        .unwrap();
    let (off, len) = slots[0];
    assert_eq!(len, BLOCK as u64);
    let lease = rt().block_on(async {
        let c = Client::connect(&socket).await.unwrap();
        let r = c
            .rpc()
            .acquire(v1::AcquireRequest {
                session: pool.session(),
                namespace: "m".into(),
                keys: vec![key(0)],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.slots.len(), 1);
        r.lease
    });
    // Straight to stdout: the test harness captures `println!`.
    let mut out = std::io::stdout();
    writeln!(out, "victim session={} lease={lease}", pool.session()).unwrap();
    out.flush().unwrap();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    pool.slot_mut(off, len).unwrap().fill(0x5a);
    let n = pool.commit("m", [key(1).as_slice()].into_iter()).unwrap();
    writeln!(out, "victim committed={n}").unwrap();
    out.flush().unwrap();
    // Hold the session (and its lease) until the test closes stdin.
    let _ = std::io::stdin().read_line(&mut line);
}

/// Finding: any client could commit, abort, lease or release under another
/// client's session, or the daemon's own session 0, and a commit of someone
/// else's reservation served the slot's previous bytes as the block.
#[test]
fn other_processes_cannot_use_a_session() {
    let dir = tempfile::tempdir().unwrap();
    let d = Kvbm::start(dir.path(), &["--host-bytes", "4MiB", "--disk-bytes", "0"]).unwrap();
    let rt = rt();
    let c = rt.block_on(Client::connect(&d.socket_str())).unwrap();
    let tcp = rt.block_on(Client::connect(&d.grpc)).unwrap();
    rt.block_on(async {
        c.register_namespace("m", BLOCK as u64).await.unwrap();
        assert!(put(&c, 0, 7).await);
    });

    let mut victim = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "victim_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KVTIER_VICTIM_SOCKET", d.socket_str())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(victim.stdout.take().unwrap()).lines();
    let mut victim_line = |prefix: &str| loop {
        let line = out.next().expect("victim exited").unwrap();
        // The harness may have begun the line ("test victim_process ... ").
        if let Some(at) = line.find(prefix) {
            break line[at + prefix.len()..].to_string();
        }
    };
    let fields = victim_line("victim ");
    let field = |name: &str| -> u64 {
        fields
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap()
            .parse()
            .unwrap()
    };
    let (session, lease) = (field("session"), field("lease"));

    rt.block_on(async {
        for (client, refused) in [
            (&c, tonic::Code::NotFound),
            (&tcp, tonic::Code::PermissionDenied),
        ] {
            for s in [session, 0] {
                let commit = client
                    .rpc()
                    .commit(v1::CommitRequest {
                        session: s,
                        namespace: "m".into(),
                        keys: vec![key(1)],
                    })
                    .await;
                assert_eq!(commit.unwrap_err().code(), refused, "commit under {s}");
                let abort = client
                    .rpc()
                    .abort(v1::AbortRequest {
                        session: s,
                        namespace: "m".into(),
                        keys: vec![key(1)],
                    })
                    .await;
                assert_eq!(abort.unwrap_err().code(), refused, "abort under {s}");
                let release = client
                    .rpc()
                    .release(v1::ReleaseRequest { session: s, lease })
                    .await;
                assert_eq!(release.unwrap_err().code(), refused, "release under {s}");
                let acquire = client
                    .rpc()
                    .acquire(v1::AcquireRequest {
                        session: s,
                        namespace: "m".into(),
                        keys: vec![key(0)],
                    })
                    .await;
                assert_eq!(acquire.unwrap_err().code(), refused, "acquire under {s}");
                let reserve = client
                    .rpc()
                    .reserve(v1::ReserveRequest {
                        session: s,
                        namespace: "m".into(),
                        blocks: vec![meta(2)],
                    })
                    .await;
                assert_eq!(reserve.unwrap_err().code(), refused, "reserve under {s}");
            }
        }
        // Not readable before its owner commits it.
        assert_eq!(get(&c, 1).await.unwrap_err().code(), tonic::Code::NotFound);
        // The victim's lease still pins its block.
        let evicted = c
            .rpc()
            .evict(v1::EvictRequest {
                namespace: "m".into(),
                keys: vec![key(0)],
            })
            .await
            .unwrap()
            .into_inner()
            .evicted;
        assert_eq!(evicted, 0, "a leased block was evicted");
    });
    let mut stdin = victim.stdin.take().unwrap();
    writeln!(stdin, "go").unwrap();
    assert_eq!(victim_line("victim committed="), "1");
    rt.block_on(async {
        assert_eq!(get(&c, 1).await.unwrap(), vec![0x5a; BLOCK]);
        assert_eq!(get(&c, 0).await.unwrap(), vec![7; BLOCK]);
    });
    drop(stdin);
    assert!(victim.wait().unwrap().success());
}

/// Finding: two 384 MiB Puts raised the daemon's RSS by ~1 GiB before being
/// refused; 48 pool-socket frames announcing 16 MiB and sending nothing took
/// 768 MiB.
#[test]
fn oversized_and_half_sent_messages_cost_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = Kvbm::start(dir.path(), &["--host-bytes", "8MiB", "--disk-bytes", "0"]).unwrap();
    let pid = d.child.id();
    let rt = rt();
    let c = rt.block_on(Client::connect(&d.socket_str())).unwrap();
    rt.block_on(c.register_namespace("m", BLOCK as u64))
        .unwrap();
    let before = rss_kib(pid);

    // Puts far beyond one block and its metadata.
    rt.block_on(async {
        let big = |i| {
            let rpc = c.rpc();
            async move {
                rpc.clone()
                    .put(v1::PutRequest {
                        namespace: "m".into(),
                        block: Some(meta(i)),
                        data: vec![1; 200 << 20],
                    })
                    .await
            }
        };
        let (a, b) = tokio::join!(big(10), big(11));
        // Refused from the length prefix (the code the client sees depends
        // on how far its send got when the stream was reset).
        assert!(a.is_err() && b.is_err());
    });

    // Pool-socket frames that announce 16 MiB and never send it.
    let pool_path = format!("{}.pool", d.socket_str());
    let mut half_sent = Vec::new();
    for _ in 0..48 {
        let mut s = std::os::unix::net::UnixStream::connect(&pool_path).unwrap();
        let mut hello = [0u8; 16];
        s.read_exact(&mut hello).unwrap();
        let mut frame = (16u32 << 20).to_le_bytes().to_vec();
        frame.push(1); // Lookup
        frame.extend_from_slice(&[0; 64]);
        s.write_all(&frame).unwrap();
        half_sent.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let grown_mib = rss_kib(pid).saturating_sub(before) / 1024;
    assert!(grown_mib < 64, "RSS grew by {grown_mib} MiB");

    // The daemon still serves, and the half-sent sessions end cleanly.
    drop(half_sent);
    rt.block_on(async {
        assert!(put(&c, 1, 3).await);
        assert_eq!(get(&c, 1).await.unwrap(), vec![3; BLOCK]);
    });
}

/// Finding: the data directory was 0755 and the disk-tier file and the
/// catalog 0644: every local user could read the cached prompts.
#[test]
fn data_files_and_sockets_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = Kvbm::start(&data, &["--host-bytes", "4MiB", "--disk-bytes", "64MiB"]).unwrap();
    let rt = rt();
    rt.block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        c.register_namespace("m", BLOCK as u64).await.unwrap();
        assert!(put(&c, 1, 1).await);
        c.sync().await.unwrap();
    });
    let mode =
        |p: &std::path::Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "data dir");
    let mut files = 0;
    let mut stack = vec![data.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let ft = std::fs::symlink_metadata(&p).unwrap().file_type();
            assert_eq!(mode(&p) & 0o077, 0, "{} is open to others", p.display());
            if ft.is_socket() {
                assert_eq!(mode(&p), 0o600, "{}", p.display());
            }
            if ft.is_dir() {
                stack.push(p);
            } else {
                files += 1;
            }
        }
    }
    assert!(files > 5, "only {files} files checked");
}

/// Findings: a second kvbm given a live daemon's socket path unlinked it and
/// took over its clients; a socket path naming a regular file would delete
/// it; SIGHUP killed the daemon without finishing its writes.
#[test]
fn sockets_are_never_taken_over_and_sighup_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let d = Kvbm::start(&dir.path().join("a"), &["--host-bytes", "4MiB"]).unwrap();
    let second = Command::new(bin("kvbm"))
        .arg("--data-dir")
        .arg(dir.path().join("b"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["--grpc", "", "--http", "", "--host-bytes", "4MiB"])
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("in use"), "{err}");
    // The first daemon still owns its socket.
    rt().block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        c.register_namespace("m", BLOCK as u64).await.unwrap();
        assert!(put(&c, 1, 9).await);
    });

    let precious = dir.path().join("precious.txt");
    std::fs::write(&precious, b"keep me").unwrap();
    let third = Command::new(bin("kvbm"))
        .arg("--data-dir")
        .arg(dir.path().join("c"))
        .arg("--socket")
        .arg(&precious)
        .args(["--grpc", "", "--http", "", "--host-bytes", "4MiB"])
        .output()
        .unwrap();
    assert!(!third.status.success());
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");

    // SIGHUP: a clean stop (exit 0), and the block is there after restart.
    let mut d = d;
    let status = Command::new("kill")
        .args(["-HUP", &d.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = d.child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
    let d = Kvbm::start(&dir.path().join("a"), &["--host-bytes", "4MiB"]).unwrap();
    rt().block_on(async {
        let c = Client::connect(&d.socket_str()).await.unwrap();
        assert_eq!(get(&c, 1).await.unwrap(), vec![9; BLOCK]);
    });
}

/// Finding: the CLI panicked on a key with a non-ASCII character.
#[test]
fn cli_refuses_non_ascii_keys_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let d = Kvbm::start(dir.path(), &["--host-bytes", "4MiB", "--disk-bytes", "0"]).unwrap();
    let out = Command::new(bin("kvtier"))
        .args(["--socket", &d.socket_str(), "lookup", "--ns", "m", "0é0a"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_ne!(out.status.code(), Some(101), "panicked: {err}");
    assert!(err.contains("invalid hex key"), "{err}");
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime, stime
    // are the 12th and 13th of them.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Findings: at the descriptor limit the accept loop spun a core and new
/// clients timed out; the HTTP port had no header timeout (slowloris
/// connections stayed open).
#[test]
fn descriptor_exhaustion_and_slow_headers() {
    let dir = tempfile::tempdir().unwrap();
    let d = Kvbm::start(dir.path(), &["--host-bytes", "4MiB", "--disk-bytes", "0"]).unwrap();
    let pid = d.child.id();
    let open_fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };

    // A client that sends half a request line and nothing else is dropped.
    let mut slow = std::net::TcpStream::connect(&d.http).unwrap();
    slow.write_all(b"GET /metr").unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let t0 = std::time::Instant::now();
    let mut buf = [0u8; 256];
    let n = slow.read(&mut buf).unwrap_or(0);
    let _ = n;
    assert!(
        t0.elapsed() < Duration::from_secs(25),
        "slow header kept open"
    );

    // Twenty descriptors from the limit, then a hundred idle clients.
    let limit = open_fds() + 20;
    let set = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .unwrap();
    assert!(set.success());
    let grpc_addr = d.grpc.trim_start_matches("http://").to_string();
    let idle: Vec<_> = (0..100)
        .map(|i| {
            let addr = if i % 2 == 0 { &grpc_addr } else { &d.http };
            std::net::TcpStream::connect(addr).unwrap()
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while open_fds() < limit - 2 {
        assert!(std::time::Instant::now() < deadline, "limit never reached");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let (t0, w0) = (cpu_ticks(pid), std::time::Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - t0;
    let wall = w0.elapsed().as_secs_f64();
    // Ticks are 1/100 s; a spinning accept loop burns ~100 a second.
    assert!(
        (used as f64) < 15.0 * wall,
        "{used} ticks of CPU in {wall:.1} s at the descriptor limit"
    );
    drop(idle);
    // Serving again once the clients are gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !d.http_get("/healthz").is_ok_and(|b| b.contains("ok")) {
        assert!(std::time::Instant::now() < deadline, "not serving again");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Finding: kvbm's TCP ports served Put, Get and Clear to anyone. With TLS,
/// a client CA and a token, only a client holding both gets in; the Unix
/// socket is unchanged and `/healthz` stays open.
#[test]
fn tcp_listeners_require_tls_client_certificates_and_a_token() {
    use kvtier_client::Credentials;
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let d = Kvbm::start_secured(
        &dir.path().join("data"),
        &pki,
        &["--host-bytes", "4MiB", "--disk-bytes", "0"],
    )
    .unwrap();
    std::fs::write(pki.join("wrong-token"), "not-the-token\n").unwrap();
    let https = d.grpc.replace("http://", "https://");
    let creds = |cert: &str, token: &str| Credentials {
        tls_ca: Some(pki.join("ours-ca.pem")),
        tls_cert: Some(pki.join(format!("{cert}.pem"))),
        tls_key: Some(pki.join(format!("{cert}.key"))),
        token_file: Some(pki.join(token)),
    };
    rt().block_on(async {
        let good = Client::connect_with(&https, &creds("client", "token"))
            .await
            .unwrap();
        good.register_namespace("m", BLOCK as u64).await.unwrap();
        assert!(put(&good, 1, 4).await);
        assert_eq!(get(&good, 1).await.unwrap(), vec![4; BLOCK]);

        for (what, token) in [("no token", None), ("a wrong token", Some("wrong-token"))] {
            let c = Credentials {
                token_file: token.map(|t| pki.join(t)),
                ..creds("client", "token")
            };
            let c = Client::connect_with(&https, &c).await.unwrap();
            let code = get(&c, 1).await.unwrap_err().code();
            assert_eq!(code, tonic::Code::Unauthenticated, "{what}");
        }
        // Without a certificate of the client CA, or without TLS at all,
        // nothing gets through.
        for c in [
            Credentials {
                tls_cert: None,
                tls_key: None,
                ..creds("client", "token")
            },
            creds("rogue", "token"),
        ] {
            let refused = match Client::connect_with(&https, &c).await {
                Ok(c) => get(&c, 1).await.is_err(),
                Err(_) => true,
            };
            assert!(refused, "{c:?}");
        }
        let plain = match Client::connect(&d.grpc).await {
            Ok(c) => get(&c, 1).await.is_err(),
            Err(_) => true,
        };
        assert!(plain, "plain TCP was served");
        // The Unix socket is the local trust boundary: no TLS, no token.
        let local = Client::connect(&d.socket_str()).await.unwrap();
        assert_eq!(get(&local, 1).await.unwrap(), vec![4; BLOCK]);
    });

    // HTTP: the same certificate rules; /metrics needs the token, /healthz not.
    let curl = |path: &str, cert: &str, token: Option<&str>| {
        let mut c = Command::new("curl");
        c.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(pki.join("ours-ca.pem"))
            .arg("--cert")
            .arg(pki.join(format!("{cert}.pem")))
            .arg("--key")
            .arg(pki.join(format!("{cert}.key")));
        if let Some(t) = token {
            c.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        let out = c.arg(format!("https://{}{path}", d.http)).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(curl("/metrics", "client", None), "401");
    assert_eq!(curl("/metrics", "client", Some("not-the-token")), "401");
    assert_eq!(curl("/metrics", "client", Some(KVBM_TOKEN)), "200");
    assert_eq!(curl("/healthz", "client", None), "200");
    assert_eq!(
        curl("/healthz", "rogue", None),
        "000",
        "a rogue certificate was served"
    );

    // The CLI takes the same credentials.
    let out = Command::new(bin("kvtier"))
        .args(["--socket", &https, "stats"])
        .arg("--tls-ca")
        .arg(pki.join("ours-ca.pem"))
        .arg("--tls-cert")
        .arg(pki.join("client.pem"))
        .arg("--tls-key")
        .arg(pki.join("client.key"))
        .arg("--auth-token-file")
        .arg(pki.join("token"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
