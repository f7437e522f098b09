//! Everything that listens: gRPC on the Unix socket and on TCP, the pool
//! socket, and HTTP for metrics and health.

pub mod grpc;
pub mod http;
pub mod pool_socket;

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kvtier_net::{AcceptOptions, BearerToken, FixAuthority, HttpOptions, Incoming};
use kvtier_proto::v1::kvbm_server::KvbmServer;
use tokio::net::{TcpListener, UnixListener};

use crate::catalog::rocks::RocksCatalog;
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::store::Store;
use crate::tenant::Principal;

/// The owner a Unix-socket peer's credentials make: the pool socket records
/// it on a new session, the gRPC socket claims it on every session call.
fn owner_of(cred: &tokio::net::unix::UCred) -> crate::store::Owner {
    crate::store::Owner::Process {
        pid: cred.pid().map_or(0, |p| p.max(0) as u32),
        uid: cred.uid(),
    }
}

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
    private_dir(&cfg.data_dir)?;
    // Fail early and clearly when the directory is not writable.
    let probe = cfg.data_dir.join(".write-probe");
    std::fs::write(&probe, b"").map_err(|e| {
        Error::io(
            format!("data dir {} is not writable", cfg.data_dir.display()),
            e,
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    let socket_gid = match &cfg.socket_group {
        Some(g) => Some(group_id(g)?),
        None => None,
    };
    if let Some(parent) = cfg.socket.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            // The group needs to traverse the directory to reach the socket.
            let mode = if socket_gid.is_some() { 0o750 } else { 0o700 };
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(parent)
                // The umask (077, set at start) would take the group's bits.
                .and_then(|_| {
                    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(mode))
                })
                .map_err(|e| Error::io(format!("cannot create {}", parent.display()), e))?;
            if let Some(gid) = socket_gid {
                chown_group(parent, gid)?;
            }
        }
    }

    // Bad TLS or token files are start-up errors, named.
    if let Some(tls) = &cfg.tls {
        tls.server_config()
            .map_err(|e| Error::io("TLS configuration", e))?;
    }
    let token = match &cfg.auth_token_file {
        Some(f) => Some(BearerToken::from_file(f).map_err(|e| Error::io("auth token", e))?),
        None => None,
    };

    let catalog = Arc::new(RocksCatalog::open_or_start_cold(&cfg.data_dir.join("catalog"))?.0);
    let store = Store::open(cfg.clone(), catalog)?;

    let uds = bind_unix(&cfg.socket, socket_gid)?;
    let pool = bind_unix(&cfg.pool_socket(), socket_gid)?;
    let tcp = bind_tcp(&cfg.grpc).await?;
    let http = bind_tcp(&cfg.http).await?;
    let authenticated =
        cfg.auth_token_file.is_some() || cfg.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    for (what, l) in [("gRPC", &tcp), ("HTTP", &http)] {
        if let Some(addr) = l.as_ref().and_then(|l| l.local_addr().ok()) {
            if !kvtier_net::is_loopback(&addr) && !authenticated {
                tracing::warn!(
                    %addr,
                    "{what} listens beyond loopback without authentication: anyone who \
                     reaches it can read, write and clear cached blocks (see docs/security.md)"
                );
            }
        }
    }
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
            tls: cfg.tls.clone(),
            token,
        },
    ))
}

/// Creates the data directory, or makes an existing one private: it holds
/// users' prompts, so only the daemon's user may enter it (0700).
fn private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .and_then(|_| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| Error::io(format!("cannot create data dir {}", dir.display()), e))
}

/// Binds a Unix socket at `path`, private to the daemon's user (0600) or
/// shared with group `gid` (0660). A socket left by a daemon that died is
/// replaced; a live daemon's socket, or anything that is not a socket, is
/// an error: a second daemon must not take over the first one's clients,
/// and a mistyped path must not delete a file.
fn bind_unix(path: &Path, gid: Option<u32>) -> Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::new(
                    ErrorKind::FailedPrecondition,
                    format!("{} is in use by a running daemon", path.display()),
                ));
            }
            std::fs::remove_file(path)
                .map_err(|e| Error::io(format!("cannot replace {}", path.display()), e))?;
        }
        Ok(_) => {
            return Err(Error::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                ),
            ))
        }
        Err(_) => {}
    }
    let l = UnixListener::bind(path)
        .map_err(|e| Error::io(format!("cannot bind {}", path.display()), e))?;
    let mode = match gid {
        Some(gid) => {
            chown_group(path, gid)?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(format!("cannot set the mode of {}", path.display()), e))?;
    Ok(l)
}

/// The id of group `name` (or a numeric id as is).
fn group_id(name: &str) -> Result<u32> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    let cname = std::ffi::CString::new(name)
        .map_err(|_| Error::invalid(format!("bad group name {name:?}")))?;
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer refers to a live buffer of the stated size.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 || out.is_null() {
        return Err(Error::invalid(format!("unknown group {name:?}")));
    }
    Ok(grp.gr_gid)
}

fn chown_group(path: &Path, gid: u32) -> Result<()> {
    std::os::unix::fs::chown(path, None, Some(gid))
        .map_err(|e| Error::io(format!("cannot give {} to group {gid}", path.display()), e))
}

pub struct Listeners {
    uds: UnixListener,
    pool: UnixListener,
    tcp: Option<TcpListener>,
    http: Option<TcpListener>,
    tls: Option<kvtier_net::TlsFiles>,
    token: Option<BearerToken>,
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

    // One block and its metadata is the largest message there is; a larger
    // one is refused from its length prefix, before its body is buffered.
    let limit = store.config().max_message_bytes();
    let svc = || {
        KvbmServer::new(grpc::Service::new(store.clone()))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    };
    let mut tasks = tokio::task::JoinSet::new();
    // Every listener accepts through kvtier-net: bounded connections, and a
    // pause instead of a spinning core when descriptors run out.
    let uds = tonic::transport::Server::builder()
        .add_service(svc())
        .serve_with_incoming_shutdown(
            // Stock grpc-core clients send the socket path as :authority.
            Incoming::new(listeners.uds, "gRPC (Unix)", AcceptOptions::default())
                .map(|c| c.map(FixAuthority::new)),
            stopped(stop_rx.clone()),
        );
    tasks.spawn(async move {
        if let Err(e) = uds.await {
            tracing::error!(error = %e, "gRPC on the Unix socket failed");
        }
    });
    if let Some(tcp) = listeners.tcp {
        let incoming = Incoming::new(tcp, "gRPC", AcceptOptions::default()).inspect(|c| {
            if let Ok(c) = c {
                let _ = c.get_ref().set_nodelay(true);
            }
        });
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &listeners.tls {
            let cfg = tls
                .tonic_config()
                .map_err(|e| Error::io("TLS configuration", e))?;
            builder = builder
                .tls_config(cfg)
                .map_err(|e| Error::invalid(format!("TLS configuration: {e}")))?;
        }
        // The operator's token makes the operator, a tenant's token the
        // tenant; with any token configured, a request without one is
        // refused. With none, TCP callers are the operator — unless there
        // are tenants and no client certificates: then an unauthenticated
        // caller could be any tenant's process, and is refused.
        let token = listeners.token.clone();
        let mtls = listeners
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca.is_some());
        let tenants = store.tenants();
        let tokens_required =
            token.is_some() || tenants.have_tokens() || (!tenants.is_empty() && !mtls);
        if tokens_required && token.is_none() && !mtls {
            tracing::warn!(
                "no operator token (auth_token_file) or client CA: TCP gRPC serves only \
                 tenants' tokens; the operator uses the Unix socket"
            );
        }
        let auth_store = store.clone();
        let authenticate = move |mut req: tonic::Request<()>| {
            let presented = req.metadata().get("authorization").map(|v| v.as_bytes());
            let who = if token.as_ref().is_some_and(|t| t.accepts(presented)) {
                Some(Principal::Operator)
            } else if let Some(tenant) = auth_store.tenants().of_token(presented) {
                Some(tenant)
            } else if tokens_required {
                None
            } else {
                Some(Principal::Operator)
            };
            match who {
                Some(who) => {
                    req.extensions_mut().insert(who);
                    Ok(req)
                }
                None => Err(tonic::Status::unauthenticated("a bearer token is required")),
            }
        };
        let srv = builder
            .layer(tonic::service::InterceptorLayer::new(authenticate))
            .add_service(svc())
            .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()));
        tasks.spawn(async move {
            if let Err(e) = srv.await {
                tracing::error!(error = %e, "gRPC on TCP failed");
            }
        });
    }
    if let Some(http) = listeners.http {
        let app = http::router(store.clone());
        let rx = stop_rx.clone();
        let tls = match &listeners.tls {
            Some(t) => Some(
                t.server_config()
                    .map_err(|e| Error::io("TLS configuration", e))?,
            ),
            None => None,
        };
        tasks.spawn(kvtier_net::serve_http(
            Incoming::new(http, "HTTP", AcceptOptions::default()),
            app,
            HttpOptions {
                tls,
                token: listeners.token.clone(),
                // Load balancers probe health without credentials.
                open_paths: vec!["/healthz"],
                ..HttpOptions::default()
            },
            stopped(rx),
        ));
    }
    let pool_task = tokio::spawn(pool_socket::serve(
        Incoming::new(
            listeners.pool,
            "pool",
            AcceptOptions {
                max_connections: store.config().max_clients,
                ..AcceptOptions::default()
            },
        ),
        store.clone(),
    ));
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
