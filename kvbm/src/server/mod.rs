//! Everything that listens: gRPC on the Unix socket and on TCP, the pool
//! socket, and HTTP for metrics and health.

pub mod grpc;
pub mod http;
pub mod pool_socket;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kvtier_proto::v1::kvbm_server::KvbmServer;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};

use crate::catalog::rocks::RocksCatalog;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::Store;

/// Where a running daemon listens (ports resolved when `:0` was asked).
#[derive(Debug, Clone)]
pub struct Listening {
    pub socket: PathBuf,
    pub pool_socket: PathBuf,
    pub grpc: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
}

impl std::fmt::Display for Listening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "socket={} pool={} grpc={} http={}",
            self.socket.display(),
            self.pool_socket.display(),
            self.grpc.map_or("off".into(), |a| a.to_string()),
            self.http.map_or("off".into(), |a| a.to_string()),
        )
    }
}

/// Opens the store and binds every listener. Errors here are start-up
/// errors (unwritable data dir, address in use) and end the process.
pub async fn start(cfg: Config) -> Result<(Arc<Store>, Listening, Listeners)> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
        Error::io(
            format!("cannot create data dir {}", cfg.data_dir.display()),
            e,
        )
    })?;
    // Fail early and clearly when the directory is not writable.
    let probe = cfg.data_dir.join(".write-probe");
    std::fs::write(&probe, b"").map_err(|e| {
        Error::io(
            format!("data dir {} is not writable", cfg.data_dir.display()),
            e,
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    if let Some(parent) = cfg.socket.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("cannot create {}", parent.display()), e))?;
    }

    let catalog = Arc::new(RocksCatalog::open(&cfg.data_dir.join("catalog"))?);
    let store = Store::open(cfg.clone(), catalog)?;

    let _ = std::fs::remove_file(&cfg.socket);
    let uds = UnixListener::bind(&cfg.socket)
        .map_err(|e| Error::io(format!("cannot bind {}", cfg.socket.display()), e))?;
    let pool = pool_socket::bind(&cfg.pool_socket())?;
    let tcp = bind_tcp(&cfg.grpc).await?;
    let http = bind_tcp(&cfg.http).await?;
    let listening = Listening {
        socket: cfg.socket.clone(),
        pool_socket: cfg.pool_socket(),
        grpc: tcp.as_ref().and_then(|l| l.local_addr().ok()),
        http: http.as_ref().and_then(|l| l.local_addr().ok()),
    };
    Ok((
        store,
        listening,
        Listeners {
            uds,
            pool,
            tcp,
            http,
        },
    ))
}

pub struct Listeners {
    uds: UnixListener,
    pool: UnixListener,
    tcp: Option<TcpListener>,
    http: Option<TcpListener>,
}

async fn bind_tcp(addr: &str) -> Result<Option<TcpListener>> {
    if addr.is_empty() {
        return Ok(None);
    }
    TcpListener::bind(addr)
        .await
        .map(Some)
        .map_err(|e| Error::io(format!("cannot listen on {addr}"), e))
}

/// Serves until `shutdown` resolves, then stops accepting, finishes
/// in-flight writes and flushes the catalog.
pub async fn serve(
    store: Arc<Store>,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let svc = || {
        KvbmServer::new(grpc::Service::new(store.clone()))
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    };
    let mut tasks = tokio::task::JoinSet::new();
    let uds = tonic::transport::Server::builder()
        .add_service(svc())
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listeners.uds),
            stopped(stop_rx.clone()),
        );
    tasks.spawn(async move {
        if let Err(e) = uds.await {
            tracing::error!(error = %e, "gRPC on the Unix socket failed");
        }
    });
    if let Some(tcp) = listeners.tcp {
        let srv = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(svc())
            .serve_with_incoming_shutdown(TcpListenerStream::new(tcp), stopped(stop_rx.clone()));
        tasks.spawn(async move {
            if let Err(e) = srv.await {
                tracing::error!(error = %e, "gRPC on TCP failed");
            }
        });
    }
    if let Some(http) = listeners.http {
        let app = http::router(store.clone());
        let rx = stop_rx.clone();
        tasks.spawn(async move {
            if let Err(e) = axum::serve(http, app)
                .with_graceful_shutdown(stopped(rx))
                .await
            {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
    }
    let pool_task = tokio::spawn(pool_socket::serve(listeners.pool, store.clone()));
    let reaper = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                store.expire();
            }
        })
    };

    shutdown.await;
    tracing::info!("stopping: finishing in-flight writes");
    let _ = stop_tx.send(true);
    pool_task.abort();
    reaper.abort();
    // Give open streams (event subscribers) a moment; then stop regardless.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.shutdown())
        .await
        .map_err(|e| Error::new(crate::error::ErrorKind::Internal, e.to_string()))??;
    tracing::info!("stopped cleanly");
    Ok(())
}
