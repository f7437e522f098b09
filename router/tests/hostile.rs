//! Hostile clients against the `kvrouter` binary over real sockets:
//! registration rules (token, switch, allow-lists, ipc binds that must not
//! replace files), the warning for listeners beyond loopback, SIGHUP, the
//! body limit, and descriptor exhaustion.

mod api_util;

use std::io::Read;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use api_util::{http, http_with, json, start, start_cmd, Proc};
use kvrouter::api::proto::envoy::r#type::v3 as httptype;
use kvrouter::api::proto::envoy::service::ext_proc::v3 as ep;
use kvrouter::api::proto::kvtier::router::v1 as pb;
use kvrouter::route::MAX_BODY_BYTES;
use serde_json::json as j;

const TOKEN: &str = "t0ken-for-tests";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn start_with(config: &str, dir: &std::path::Path, http: &str) -> Proc {
    let cfg = dir.join("kvrouter.toml");
    std::fs::write(&cfg, config).expect("config");
    start(
        &[
            "--http",
            http,
            "--grpc",
            "127.0.0.1:0",
            "--config",
            cfg.to_str().expect("path"),
        ],
        &[],
    )
}

#[test]
fn registration_needs_the_token_and_stays_inside_the_allow_lists() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ipc = d.join("ipc");
    std::fs::create_dir(&ipc).expect("mkdir");
    std::fs::write(d.join("token"), format!("{TOKEN}\n")).expect("token");
    // files a hostile registration would like to see replaced by a socket
    let outside = d.join("precious");
    let inside = ipc.join("precious");
    for f in [&outside, &inside] {
        std::fs::write(f, b"keep me").expect("write");
    }
    let p = start_with(
        &format!(
            r#"
[registration]
token_file = "{}"
ipc_dir = "{}"
allow_connect = ["127.0.0.1:7000-7100", "unix:{}"]
allow_bind = ["127.0.0.1"]
"#,
            d.join("token").display(),
            ipc.display(),
            ipc.display()
        ),
        d,
        "127.0.0.1:0",
    );
    let a = p.http;
    let auth = format!("Authorization: Bearer {TOKEN}");
    let worker = |extra: serde_json::Value| {
        let mut w = j!({"worker_id": "w1", "endpoint": "10.0.0.1:8000", "model": "m"});
        if let (Some(w), Some(e)) = (w.as_object_mut(), extra.as_object()) {
            w.extend(e.clone());
        }
        w.to_string()
    };
    let post = |headers: &[&str], body: &str| {
        http_with(a, "POST", "/v1/workers", headers, body.as_bytes())
    };

    // no token, a wrong one, another scheme: 401, nothing registered
    for h in [
        &[][..],
        &["Authorization: Bearer nope"][..],
        &["Authorization: Basic dDBrZW4="][..],
    ] {
        let (s, b) = post(h, &worker(j!({})));
        assert_eq!(s, 401, "{h:?}: {b}");
        assert!(json(&b)["error"]
            .as_str()
            .is_some_and(|e| e.contains("token")));
    }
    assert_eq!(http(a, "DELETE", "/v1/workers/w1", None).0, 401);
    let (_, b) = http(a, "GET", "/v1/workers", None);
    assert_eq!(json(&b)["workers"].as_array().map(Vec::len), Some(0));

    // addresses outside the rules: 403 naming the field
    for (field, extra) in [
        (
            "zmq_endpoint",
            j!({"zmq_endpoint": format!("bind:ipc://{}", outside.display())}),
        ),
        (
            "zmq_endpoint",
            j!({"zmq_endpoint": format!("bind:ipc://{}", inside.display())}),
        ),
        (
            "zmq_endpoint",
            j!({"zmq_endpoint": format!("bind:ipc://{}/../precious", ipc.display())}),
        ),
        (
            "zmq_endpoint",
            j!({"zmq_endpoint": "bind:tcp://0.0.0.0:7001"}),
        ),
        ("zmq_endpoint", j!({"zmq_endpoint": "tcp://*:7001"})),
        (
            "zmq_endpoint",
            j!({"zmq_endpoint": "tcp://127.0.0.1:7000", "dp_ranks": 200}),
        ),
        ("zmq_endpoint", j!({"zmq_endpoint": "tcp://10.9.9.9:7000"})),
        (
            "zmq_replay_endpoint",
            j!({"zmq_replay_endpoint": "tcp://127.0.0.1:22"}),
        ),
        ("kvbm", j!({"kvbm": "http://10.9.9.9:7070"})),
        ("kvbm", j!({"kvbm": "unix:/var/run/docker.sock"})),
        (
            "metrics_url",
            j!({"metrics_url": "http://169.254.169.254/latest/meta-data"}),
        ),
    ] {
        let (s, b) = post(&[&auth], &worker(extra.clone()));
        assert_eq!(s, 403, "{extra} -> {b}");
        let e = json(&b)["error"].as_str().unwrap_or_default().to_string();
        assert!(e.starts_with(field), "{extra} -> {e}");
    }
    let (s, b) = post(
        &[&auth],
        &worker(j!({"zmq_endpoint": format!("bind:ipc://{}", inside.display())})),
    );
    assert!(b.contains("regular file"), "{s} {b}");
    for f in [&outside, &inside] {
        assert_eq!(std::fs::read(f).expect("intact"), b"keep me");
    }

    // inside the rules: registered, and the ipc socket is bound in ipc_dir
    let sock = ipc.join("engine.sock");
    let ok = worker(j!({
        "zmq_endpoint": format!("bind:ipc://{}", sock.display()),
        "metrics_url": "http://127.0.0.1:7001/metrics",
    }));
    let (s, b) = post(&[&auth], &ok);
    assert_eq!(s, 201, "{b}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        use std::os::unix::fs::FileTypeExt;
        let is_sock = std::fs::symlink_metadata(&sock).is_ok_and(|m| m.file_type().is_socket());
        if is_sock {
            break;
        }
        assert!(Instant::now() < deadline, "socket never bound");
        std::thread::sleep(Duration::from_millis(50));
    }
    let bound = worker(j!({"worker_id": "w2", "zmq_endpoint": "bind:tcp://127.0.0.1:0"}));
    assert_eq!(post(&[&auth], &bound).0, 201);
    let h = [auth.as_str()];
    assert_eq!(http_with(a, "DELETE", "/v1/workers/w1", &h, b"").0, 204);

    // the same rules over gRPC
    let url = format!("http://{}", p.grpc);
    runtime().block_on(async move {
        let mut rc = pb::router_client::RouterClient::connect(url)
            .await
            .expect("connect");
        let w = pb::Worker {
            worker_id: "g1".into(),
            endpoint: "10.0.0.2:8000".into(),
            model: "m".into(),
            ..Default::default()
        };
        let e = rc.add_worker(w.clone()).await.expect_err("no token");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let with_token = |w: pb::Worker, token: &str| {
            let mut r = tonic::Request::new(w);
            let v = format!("Bearer {token}").parse().expect("metadata");
            r.metadata_mut().insert("authorization", v);
            r
        };
        let e = rc
            .add_worker(with_token(w.clone(), "wrong"))
            .await
            .expect_err("wrong token");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let mut bad = w.clone();
        bad.kvbm = Some("http://10.9.9.9:7070".into());
        let e = rc
            .add_worker(with_token(bad, TOKEN))
            .await
            .expect_err("outside allow_connect");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let r = rc
            .add_worker(with_token(w, TOKEN))
            .await
            .expect("registered");
        assert!(r.into_inner().created);
        let e = rc
            .remove_worker(pb::RemoveWorkerRequest {
                worker_id: "g1".into(),
            })
            .await
            .expect_err("no token");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    });
}

#[test]
fn disabled_registration_and_the_warning_for_open_listeners() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = start_with("[registration]\nenabled = false\n", dir.path(), "0.0.0.0:0");
    let w = j!({"worker_id": "w1", "endpoint": "10.0.0.1:8000", "model": "m"}).to_string();
    let (s, b) = http(p.http, "POST", "/v1/workers", Some(&w));
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("disabled"), "{b}");
    assert_eq!(http(p.http, "DELETE", "/v1/workers/w1", None).0, 403);
    let warn = p.log_line(&["WARN", "beyond loopback", "HTTP"], Duration::from_secs(5));
    assert!(
        warn.is_some(),
        "no warning for the HTTP listener on 0.0.0.0"
    );
    assert!(
        p.log_line(&["beyond loopback", "gRPC"], Duration::ZERO)
            .is_none(),
        "the loopback gRPC listener was warned about"
    );
    let url = format!("http://{}", p.grpc);
    runtime().block_on(async move {
        let mut rc = pb::router_client::RouterClient::connect(url)
            .await
            .expect("connect");
        let e = rc
            .add_worker(pb::Worker {
                worker_id: "g".into(),
                endpoint: "e:1".into(),
                model: "m".into(),
                ..Default::default()
            })
            .await
            .expect_err("disabled");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    });
}

#[test]
fn sighup_shuts_down_cleanly() {
    let mut p = start(&["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"], &[]);
    assert_eq!(http(p.http, "GET", "/health", None).0, 200);
    assert!(
        p.log_line(&["beyond loopback"], Duration::ZERO).is_none(),
        "loopback listeners were warned about"
    );
    let st = Command::new("kill")
        .args(["-HUP", &p.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = p.child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "still running after SIGHUP");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
    assert!(p
        .log_line(&["shutting down", "SIGHUP"], Duration::from_secs(5))
        .is_some());
    assert!(p.log_line(&["stopped"], Duration::from_secs(5)).is_some());
}

#[test]
fn bodies_past_the_limit_are_413() {
    let p = start(&["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"], &[]);
    // at the limit: parsed (and refused for what it says, not its size)
    let mut big = br#"{"model": "m", "prompt": ""#.to_vec();
    big.resize(MAX_BODY_BYTES - 2, b'a');
    big.extend_from_slice(br#""}"#);
    let (s, b) = http_with(p.http, "POST", "/v1/route", &[], &big);
    assert_ne!(s, 413, "{b}");
    // one byte more: 413 with a JSON reason
    big.insert(big.len() - 2, b'a');
    for path in ["/v1/route", "/v1/workers"] {
        let (s, b) = http_with(p.http, "POST", path, &[], &big);
        assert_eq!(s, 413, "{path}: {b}");
        let e = json(&b)["error"].as_str().unwrap_or_default().to_string();
        assert!(e.contains(&MAX_BODY_BYTES.to_string()), "{e}");
    }
    // ext_proc: the same bound on the buffered body, then 413
    let url = format!("http://{}", p.grpc);
    runtime().block_on(async move {
        let mut xc = ep::external_processor_client::ExternalProcessorClient::connect(url)
            .await
            .expect("connect");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut stream = xc
            .process(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("process")
            .into_inner();
        let chunk = |n: usize, last: bool| ep::ProcessingRequest {
            request: Some(ep::processing_request::Request::RequestBody(ep::HttpBody {
                body: vec![b' '; n],
                end_of_stream: last,
            })),
            metadata_context: None,
            observability_mode: false,
        };
        tx.send(chunk(MAX_BODY_BYTES / 2 + 1, false))
            .await
            .expect("send");
        let first = stream.message().await.expect("recv").expect("answer");
        assert!(matches!(
            first.response,
            Some(ep::processing_response::Response::RequestBody(_))
        ));
        tx.send(chunk(MAX_BODY_BYTES / 2 + 1, true))
            .await
            .expect("send");
        let r = stream.message().await.expect("recv").expect("answer");
        let Some(ep::processing_response::Response::ImmediateResponse(i)) = r.response else {
            panic!("not an immediate response: {r:?}");
        };
        assert_eq!(
            i.status.map(|s| s.code),
            Some(httptype::StatusCode::PayloadTooLarge as i32)
        );
    });
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // fields after the parenthesized command name; utime and stime are the
    // 14th and 15th fields of the whole line
    let rest = stat.rsplit_once(") ").map(|x| x.1).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

fn health_ok(addr: std::net::SocketAddr) -> bool {
    use std::io::Write;
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}

#[test]
fn descriptor_exhaustion_neither_spins_nor_sticks() {
    let mut sh = Command::new("sh");
    sh.args(["-c", "ulimit -n 64 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_kvrouter"));
    let p = start_cmd(sh, &["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"], &[]);
    let pid = p.child.id();
    // More idle clients than the process has descriptors: the rest wait in
    // the kernel's backlog, and every accept of them fails with EMFILE.
    let mut idle = Vec::new();
    for i in 0..100 {
        let addr = if i % 2 == 0 { p.grpc } else { p.http };
        idle.push(TcpStream::connect(addr).expect("connect (backlog)"));
    }
    let open_fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds() < 60 {
        assert!(
            Instant::now() < deadline,
            "the descriptor limit was never reached ({} open)",
            open_fds()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let t0 = cpu_ticks(pid);
    let w0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - t0;
    let wall = w0.elapsed().as_secs_f64();
    // Ticks are 1/100 s on Linux; a spinning accept loop burns ~100 a second.
    assert!(
        (used as f64) < 0.15 * 100.0 * wall,
        "{used} ticks of CPU in {wall:.1} s at the descriptor limit"
    );
    assert!(
        p.log_line(&["accept failed"], Duration::ZERO).is_some(),
        "the failing accepts were not logged"
    );
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !health_ok(p.http) {
        assert!(
            Instant::now() < deadline,
            "not serving again after the clients left"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
