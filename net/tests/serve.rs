//! `serve_http` over real sockets: a slowloris client and an idle one are
//! disconnected after the header read timeout, a slow body gets 408, a
//! Unix listener serves too, and shutdown lets a request in progress finish.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use axum::routing::{get, post};
use kvtier_net::{serve_http, AcceptOptions, HttpOptions, Incoming};

fn app() -> axum::Router {
    axum::Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/echo", post(|b: axum::body::Bytes| async move { b }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "done"
            }),
        )
}

fn options() -> HttpOptions {
    HttpOptions {
        header_read_timeout: Duration::from_millis(300),
        request_timeout: Duration::from_millis(500),
        shutdown_grace: Duration::from_secs(5),
        ..HttpOptions::default()
    }
}

/// Reads until EOF (or a 10 s safety deadline); returns what came and when
/// the read ended.
fn read_all(s: &mut TcpStream) -> (String, Instant) {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (String::from_utf8_lossy(&out).into_owned(), Instant::now())
}

async fn start(
    opts: HttpOptions,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve_http(
        Incoming::new(l, "test", AcceptOptions::default()),
        app(),
        opts,
        async move {
            let _ = rx.await;
        },
    ));
    (addr, tx, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_idle_clients_are_disconnected() {
    let (addr, _stop, _task) = start(options()).await;
    tokio::task::spawn_blocking(move || {
        // a partial request line, then nothing
        let mut slow = TcpStream::connect(addr).expect("connect");
        let t0 = Instant::now();
        slow.write_all(b"GET /heal").expect("write");
        // an idle connection that never sends a byte
        let mut idle = TcpStream::connect(addr).expect("connect");
        let (_, end) = read_all(&mut slow);
        let waited = end - t0;
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
            "slowloris held for {waited:?}"
        );
        let (_, end) = read_all(&mut idle);
        assert!(end - t0 < Duration::from_secs(5), "idle connection kept");

        // a kept-alive connection is closed once idle past the timeout
        let mut ka = TcpStream::connect(addr).expect("connect");
        ka.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        let t1 = Instant::now();
        let (text, end) = read_all(&mut ka);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(end - t1 < Duration::from_secs(5));

        // a body that never arrives: 408 within the request deadline
        let mut body = TcpStream::connect(addr).expect("connect");
        body.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
            .expect("write");
        let (text, _) = read_all(&mut body);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("timed out"), "{text}");
    })
    .await
    .expect("client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_progress_and_closes_the_listener() {
    let (addr, stop, task) = start(options()).await;
    let client = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        read_all(&mut s).0
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("serve_http returned")
        .expect("task");
    let text = client.await.expect("client");
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("done"),
        "{text}"
    );
    assert!(TcpStream::connect(addr).is_err(), "listener still open");
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_a_unix_listener() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("http.sock");
    let l = tokio::net::UnixListener::bind(&path).expect("bind");
    let _task = tokio::spawn(serve_http(
        Incoming::new(l, "test", AcceptOptions::default()),
        app(),
        options(),
        std::future::pending(),
    ));
    let text = tokio::task::spawn_blocking(move || {
        let mut s = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
    .await
    .expect("client");
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("ok"),
        "{text}"
    );
}
