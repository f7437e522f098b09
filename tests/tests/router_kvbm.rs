//! kvbm → kvrouter end to end: a real daemon's event stream feeds a real
//! router process, which then routes by prefix and tier.

use std::io::{BufRead, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvtier_client::Client;
use kvtier_e2e::{bin, put_chain, Garage, Kvbm};

struct Router {
    child: Child,
    http: String,
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_router() -> Router {
    let mut child = Command::new(bin("kvrouter"))
        .args(["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(addr) = line.split("HTTP listening on ").nth(1) {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    let http = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("kvrouter printed its HTTP address");
    Router { child, http }
}

fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

const BLOCK_TOKENS: u32 = 16;

/// Registers workers of model `m`, each with its kvbm.
fn register(router: &Router, workers: &[(&str, &Kvbm)]) {
    for (id, d) in workers {
        let body = format!(
            r#"{{"worker_id":"{id}","endpoint":"http://{id}:8000","model":"m","kvbm":"unix:{}"}}"#,
            d.socket.display()
        );
        let (status, resp) = http(&router.http, "POST", "/v1/workers", &body);
        assert!(status == 200 || status == 201, "{status} {resp}");
    }
}

#[test]
fn router_routes_to_the_worker_whose_kvbm_holds_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let a = Kvbm::start(
        &dir.path().join("a"),
        &["--host-bytes", "8MiB", "--disk-bytes", "0"],
    )
    .unwrap();
    let b = Kvbm::start(
        &dir.path().join("b"),
        &["--host-bytes", "8MiB", "--disk-bytes", "0"],
    )
    .unwrap();
    let router = start_router();
    register(&router, &[("wa", &a), ("wb", &b)]);
    // Worker b's kvbm stores a 4-block prefix (tokens 0..64).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tokens = rt.block_on(async {
        let c = Client::connect(&b.socket_str()).await.unwrap();
        put_chain(&c, "m", BLOCK_TOKENS, 4).await
    });
    // The request shares the 4 blocks and adds 2 of its own.
    let mut request = tokens.clone();
    request.extend(1000..1000 + 2 * BLOCK_TOKENS);
    let body = format!(r#"{{"model":"m","token_ids":{:?}}}"#, request);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, resp) = http(&router.http, "POST", "/v1/route", &body);
        assert_eq!(status, 200, "{resp}");
        if resp.contains(r#""worker_id":"wb","endpoint""#) && resp.contains(r#""host":4"#) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "router never learnt b's blocks: {resp}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The daemon restarts empty (new incarnation): the router forgets b's blocks.
    drop(b);
    let b2 = Kvbm::start(
        &dir.path().join("b2"),
        &["--host-bytes", "8MiB", "--disk-bytes", "0"],
    )
    .unwrap();
    register(&router, &[("wc", &b2)]);
    let (status, _) = http(&router.http, "DELETE", "/v1/workers/wb", "");
    assert!(status == 200 || status == 204, "{status}");
    let (_, resp) = http(&router.http, "POST", "/v1/route", &body);
    assert!(
        !resp.contains(r#""host":4"#),
        "deleted worker's blocks purged: {resp}"
    );
}

/// The route's JSON entry of worker `id` (the candidates list names each
/// worker once).
fn candidate<'a>(resp: &'a str, id: &str) -> Option<&'a str> {
    let at = resp.find(&format!(r#""worker_id":"{id}""#))?;
    let rest = &resp[at..];
    Some(&rest[..rest.find('}').map_or(rest.len(), |e| e + 1)])
}

/// G4 is shared: a chain one worker's kvbm uploaded counts, at G4's price,
/// for a worker whose kvbm on the same bucket never saw it (it learnt the
/// blocks from the bucket and published them as its own G4 holdings).
#[test]
fn a_chain_in_the_shared_bucket_counts_for_every_worker_on_it() {
    let Some(g) = Garage::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("kvbm.toml");
    std::fs::write(
        &conf,
        "remote_url = \"s3://kvtier/route\"\nremote_admit = 1\nremote_linger_ms = 100\n\
         remote_poll_ms = 250\nremote_timeout_ms = 3000\nremote_segment_bytes = \"1MiB\"\n",
    )
    .unwrap();
    let conf = conf.display().to_string();
    let args = [
        "--config",
        &conf,
        "--host-bytes",
        "8MiB",
        "--disk-bytes",
        "0",
    ];
    let a = Kvbm::start_env(&dir.path().join("a"), &args, &g.env()).unwrap();
    let b = Kvbm::start_env(&dir.path().join("b"), &args, &g.env()).unwrap();
    let router = start_router();
    register(&router, &[("wa", &a), ("wb", &b)]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tokens = rt.block_on(async {
        // B's engine uses the same model (namespace) but never this prompt.
        let cb = Client::connect(&b.socket_str()).await.unwrap();
        put_chain(&cb, "m", BLOCK_TOKENS, 0).await;
        let ca = Client::connect(&a.socket_str()).await.unwrap();
        put_chain(&ca, "m", BLOCK_TOKENS, 4).await
    });
    let body = format!(r#"{{"model":"m","token_ids":{:?}}}"#, tokens);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, resp) = http(&router.http, "POST", "/v1/route", &body);
        assert_eq!(status, 200, "{resp}");
        let (ca, cb) = (candidate(&resp, "wa"), candidate(&resp, "wb"));
        if ca.is_some_and(|c| c.contains(r#""host":4"#))
            && cb.is_some_and(|c| c.contains(r#""remote":4"#))
        {
            assert!(cb.is_some_and(|c| c.contains(r#""host":0"#)), "{resp}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the router never credited wb with the G4 chain: {resp}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
