//! Helpers of the ingestion tests: the vLLM interpreter, scripted Python
//! peers, a sink collecting events, free ports.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvrouter::event::{EventSink, IndexEvent};
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Held by tests that start Python peers on ports picked by [`free_ports`],
/// so two of them never race for the same port.
pub static PY_PORTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The interpreter with vllm==0.32.0 (`KVTIER_PYTHON`). Absent: a failure
/// under CI, a skip elsewhere (same rule as `kvtier_e2e::python_with_vllm`).
pub fn python_with_vllm() -> Option<PathBuf> {
    match std::env::var_os("KVTIER_PYTHON") {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var_os("CI").is_some() => {
            panic!("KVTIER_PYTHON is not set under CI: run the tests through scripts/test-all")
        }
        None => {
            eprintln!("skipping: KVTIER_PYTHON is not set (scripts/test-all sets it)");
            None
        }
    }
}

pub fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(name)
}

/// A Python helper driven by JSON lines on stdin, answering one line each.
pub struct Py {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Py {
    pub fn spawn(python: &PathBuf, script_name: &str) -> Py {
        let mut child = Command::new(python)
            .arg(script(script_name))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start python");
        let stdin = child.stdin.take().expect("stdin");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Py {
            child,
            stdin,
            lines,
        }
    }

    pub async fn cmd(&mut self, v: serde_json::Value) -> serde_json::Value {
        let mut line = v.to_string();
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .expect("write to python");
        self.stdin.flush().await.expect("flush");
        let reply = tokio::time::timeout(Duration::from_secs(120), self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("python did not answer {v}"))
            .expect("read python")
            .unwrap_or_else(|| panic!("python exited on {v}"));
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("python said {reply:?}: {e}"))
    }

    pub async fn exit(mut self) {
        let _ = self.cmd(serde_json::json!({"cmd": "exit"})).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// A sink that keeps every event.
#[derive(Default)]
pub struct Collect {
    pub events: Mutex<Vec<IndexEvent>>,
}

impl EventSink for Collect {
    fn apply(&self, event: IndexEvent) {
        self.events.lock().push(event);
    }
}

impl Collect {
    pub fn new() -> Arc<Collect> {
        Arc::new(Collect::default())
    }

    pub fn len(&self) -> usize {
        self.events.lock().len()
    }

    pub fn take(&self) -> Vec<IndexEvent> {
        std::mem::take(&mut *self.events.lock())
    }

    /// Waits until at least `n` events arrived; returns them all (taken).
    pub async fn wait_n(&self, n: usize, what: &str) -> Vec<IndexEvent> {
        wait_until(|| self.len() >= n, what).await;
        // let stragglers (duplicates that should not exist) show up
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.take()
    }
}

/// Polls `cond` for up to 30 s.
pub async fn wait_until(mut cond: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > Duration::from_secs(30) {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP port free on 127.0.0.1 with the next `n - 1` ports free too.
pub fn free_ports(n: u16) -> u16 {
    for _ in 0..200 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = l.local_addr().expect("addr").port();
        drop(l);
        if base.checked_add(n).is_none() {
            continue;
        }
        let ok = (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if ok {
            return base;
        }
    }
    panic!("no free ports")
}
