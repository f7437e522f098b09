//! kvrouter subscribed to a kvbm whose TCP gRPC port takes TLS, a client
//! CA and a token: with `[kvbm_client]` credentials the router learns the
//! daemon's blocks; without them it learns nothing.

use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvtier_client::Client;
use kvtier_e2e::{bin, put_chain, Kvbm};

const BLOCK_TOKENS: u32 = 16;

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

/// A router whose one worker `w` has its blocks in the kvbm at `kvbm`.
fn start_router(dir: &Path, kvbm: &str, kvbm_client: &str) -> Router {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join("kvrouter.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[[workers]]
worker_id = "w"
endpoint = "http://w:8000"
model = "m"
kvbm = "{kvbm}"
[kvbm_client]
{kvbm_client}
"#
        ),
    )
    .unwrap();
    let mut child = Command::new(bin("kvrouter"))
        .args(["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0", "--config"])
        .arg(&cfg)
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

/// The body of `POST /v1/route` with `body`.
fn route(addr: &str, body: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /v1/route HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(
        out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200"),
        "{out}"
    );
    out.split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default()
}

#[test]
fn router_subscribes_to_a_tls_kvbm_only_with_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let kvbm = Kvbm::start_secured(
        &dir.path().join("kvbm"),
        &pki,
        &["--host-bytes", "8MiB", "--disk-bytes", "0"],
    )
    .unwrap();
    let f = |n: &str| pki.join(n).display().to_string();
    let https = kvbm.grpc.replace("http://", "https://");
    let full = format!(
        "tls_ca = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntoken_file = \"{}\"",
        f("ours-ca.pem"),
        f("client.pem"),
        f("client.key"),
        f("token")
    );
    let with = start_router(&dir.path().join("with"), &https, &full);
    let without = start_router(&dir.path().join("without"), &https, "");
    // TLS and a client certificate, but no token.
    let no_token = format!(
        "tls_ca = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"",
        f("ours-ca.pem"),
        f("client.pem"),
        f("client.key"),
    );
    let tokenless = start_router(&dir.path().join("tokenless"), &https, &no_token);

    // kvbm stores a 4-block prefix (tokens 0..64), put over its Unix socket.
    let tokens = kvtier_e2e::rt().block_on(async {
        let c = Client::connect(&kvbm.socket_str()).await.unwrap();
        put_chain(&c, "m", BLOCK_TOKENS, 4).await
    });
    let body = format!(r#"{{"model":"m","token_ids":{:?}}}"#, tokens);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let resp = route(&with.http, &body);
        if resp.contains(r#""host":4"#) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the router with credentials never learnt kvbm's blocks: {resp}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The others had as long, and a moment more, to connect.
    std::thread::sleep(Duration::from_secs(1));
    for (what, r) in [("no credentials", &without), ("no token", &tokenless)] {
        let resp = route(&r.http, &body);
        assert!(
            !resp.contains(r#""host":4"#),
            "a router with {what} learnt kvbm's blocks: {resp}"
        );
    }
}
