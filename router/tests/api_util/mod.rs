//! Helpers of the API tests: a minimal HTTP/1.1 client over a real socket,
//! the `kvrouter` binary started as a process.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One HTTP/1.1 request (`Connection: close`); returns (status, body).
pub fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    http_with(addr, method, path, &[], body.unwrap_or("").as_bytes())
}

/// One HTTP/1.1 request with extra header lines (`"Name: value"`).
pub fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut extra = String::new();
    for h in headers {
        extra.push_str(h);
        extra.push_str("\r\n");
    }
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("write");
    s.write_all(body).expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("header");
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .expect("status");
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n.min(rest.len())]);
        s = rest.get(n + 2..).unwrap_or("");
    }
    out
}

pub fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The `kvrouter` binary, killed on drop.
pub struct Proc {
    pub child: Child,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    /// Everything it wrote on stderr so far (also echoed to ours).
    pub log: Arc<Mutex<String>>,
}

impl Proc {
    /// Waits up to `timeout` for a log line containing every one of `words`.
    pub fn log_line(&self, words: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .log
                .lock()
                .map(|l| {
                    l.lines()
                        .find(|line| words.iter().all(|w| line.contains(w)))
                        .map(str::to_string)
                })
                .unwrap_or_default();
            if found.is_some() || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `kvrouter` on ephemeral ports with `args`, reads the addresses it
/// prints.
pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Proc {
    start_cmd(Command::new(env!("CARGO_BIN_EXE_kvrouter")), args, envs)
}

/// [`start`] through a command that execs `kvrouter` with `args` appended
/// (e.g. a shell that lowers a limit first).
pub fn start_cmd(mut cmd: Command, args: &[&str], envs: &[(&str, &str)]) -> Proc {
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("KVROUTER_HTTP")
        .env_remove("KVROUTER_GRPC")
        .env_remove("KVROUTER_CONFIG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start kvrouter");
    let log = Arc::new(Mutex::new(String::new()));
    let stderr = child.stderr.take().expect("stderr");
    let log2 = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if let Ok(mut l) = log2.lock() {
                l.push_str(&line);
                l.push('\n');
            }
        }
    });
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut http = None;
    let mut grpc = None;
    while http.is_none() || grpc.is_none() {
        let line = match lines.next() {
            Some(Ok(l)) => l,
            _ => {
                let _ = child.kill();
                panic!("kvrouter exited before printing its addresses");
            }
        };
        let addr = line.rsplit(' ').next().and_then(|a| a.parse().ok());
        if line.contains("HTTP listening") {
            http = addr;
        } else if line.contains("gRPC") {
            grpc = addr;
        }
    }
    Proc {
        child,
        http: http.expect("http"),
        grpc: grpc.expect("grpc"),
        log,
    }
}
