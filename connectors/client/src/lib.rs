//! Rust client of the kvbm daemon.
//!
//! - [`Client`]: the `kvtier.v1.Kvbm` gRPC API over the daemon's Unix socket
//!   or TCP.
//! - [`Pool`]: the zero-copy path. A local client attaches the daemon's
//!   shared host pool through the pool socket (`<socket>.pool`), maps it, and
//!   moves block bytes with `Reserve`/`Commit` and `Acquire`/`Release`.
//! - [`Session`]: a session on the pool socket without the mapping, for the
//!   latency-critical Lookup (binary frames instead of gRPC).
//! - [`cost`]: whether loading a cached prefix beats recomputing it.

pub mod cost;
mod pool;

pub use kvtier_proto::session::LookupCounts;
pub use kvtier_proto::v1;
pub use pool::{pool_socket_path, Pool, Session};

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};
use v1::kvbm_client::KvbmClient;

/// What can go wrong talking to kvbm.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to kvbm at {addr}: {source}")]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("invalid kvbm address {0:?}: use /path/to/socket, unix:/path or http://host:port")]
    Address(String),
    #[error("kvbm: {0}")]
    Status(#[from] tonic::Status),
    #[error("kvbm credentials: {0}")]
    Credentials(String),
    #[error("pool socket {path}: {source}")]
    Pool {
        path: String,
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A connection to one kvbm daemon. Cheap to clone: clones share the channel.
#[derive(Clone, Debug)]
pub struct Client {
    rpc: Rpc,
}

/// The generated gRPC client, with the credentials of its [`Client`].
pub type Rpc = KvbmClient<InterceptedService<Channel, Authorization>>;

/// What a TCP port of kvbm may require (see `docs/security.md`): TLS with a
/// CA to check the daemon against, a client certificate for mutual TLS, a
/// bearer token. Unused on the Unix socket. Each is a PEM or token file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// Speak TLS, trusting this CA for the daemon's certificate.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key for mutual TLS (both or neither).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Bearer token sent with every call.
    pub token_file: Option<PathBuf>,
}

/// Adds the bearer token, if any, to every call.
#[derive(Clone, Debug, Default)]
pub struct Authorization(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Authorization {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

fn read(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Credentials(format!("{}: {e}", path.display())))
}

impl Credentials {
    fn authorization(&self) -> Result<Authorization> {
        let Some(f) = &self.token_file else {
            return Ok(Authorization(None));
        };
        let token = String::from_utf8(read(f)?)
            .map_err(|_| Error::Credentials(format!("{}: not UTF-8", f.display())))?;
        let v = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| Error::Credentials(format!("{}: not a valid token", f.display())))?;
        Ok(Authorization(Some(v)))
    }

    fn tls(&self) -> Result<Option<ClientTlsConfig>> {
        let Some(ca) = &self.tls_ca else {
            if self.tls_cert.is_some() || self.tls_key.is_some() {
                return Err(Error::Credentials(
                    "a client certificate needs tls_ca".into(),
                ));
            }
            return Ok(None);
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => tls = tls.identity(Identity::from_pem(read(c)?, read(k)?)),
            (None, None) => {}
            _ => {
                return Err(Error::Credentials(
                    "tls_cert and tls_key go together".into(),
                ))
            }
        }
        Ok(Some(tls))
    }
}

/// The socket path of a `/path` or `unix:/path` address; `None` for a TCP
/// URL (`http://…`, `https://…`).
pub fn unix_socket_path(addr: &str) -> Option<std::path::PathBuf> {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        return None;
    }
    Some(addr.strip_prefix("unix:").unwrap_or(addr).into())
}

/// Where kvbm listens by default (`kvbm` with no flags).
pub const DEFAULT_SOCKET: &str = "kvtier-data/kvbm.sock";

impl Client {
    /// Connects to `addr`: a Unix socket path (`/run/kvbm.sock`,
    /// `unix:/run/kvbm.sock`) or a TCP URL (`http://127.0.0.1:50051`).
    pub async fn connect(addr: &str) -> Result<Client> {
        Client::connect_with(addr, &Credentials::default()).await
    }

    /// Connects to `addr` as [`Client::connect`], presenting `creds` on TCP
    /// (an `https://` address needs `tls_ca`).
    pub async fn connect_with(addr: &str, creds: &Credentials) -> Result<Client> {
        let channel = if unix_socket_path(addr).is_none() {
            let mut ep = Endpoint::from_shared(addr.to_string())
                .map_err(|_| Error::Address(addr.to_string()))?
                .tcp_nodelay(true);
            if let Some(tls) = creds.tls()? {
                ep = ep.tls_config(tls).map_err(|source| Error::Connect {
                    addr: addr.to_string(),
                    source,
                })?;
            }
            ep.connect().await.map_err(|source| Error::Connect {
                addr: addr.to_string(),
                source,
            })?
        } else {
            let path = unix_socket_path(addr).unwrap_or_default();
            if path.as_os_str().is_empty() {
                return Err(Error::Address(addr.to_string()));
            }
            // The URI is required by tonic but unused: the connector below
            // dials the socket path.
            Endpoint::from_static("http://kvbm.local")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                }))
                .await
                .map_err(|source| Error::Connect {
                    addr: addr.to_string(),
                    source,
                })?
        };
        Ok(Client {
            rpc: KvbmClient::with_interceptor(channel, creds.authorization()?)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        })
    }

    /// The generated gRPC client, for any call of the API.
    pub fn rpc(&self) -> Rpc {
        self.rpc.clone()
    }

    /// Registers a namespace with no layout description (the CLI's
    /// `ns create`); connectors pass their full layout through [`Client::rpc`].
    pub async fn register_namespace(&self, name: &str, block_bytes: u64) -> Result<v1::Namespace> {
        let resp = self
            .rpc()
            .register_namespace(v1::RegisterNamespaceRequest {
                name: name.to_string(),
                block_bytes,
                layout: None,
            })
            .await?
            .into_inner();
        resp.namespace
            .ok_or_else(|| Error::Status(tonic::Status::internal("empty namespace in reply")))
    }

    /// Longest prefix of the `keys` chain present in kvbm.
    pub async fn lookup(&self, namespace: &str, keys: Vec<Vec<u8>>) -> Result<v1::LookupResponse> {
        Ok(self
            .rpc()
            .lookup(v1::LookupRequest {
                namespace: namespace.to_string(),
                keys,
            })
            .await?
            .into_inner())
    }

    /// Waits until write-behind is on disk; returns the durable block count.
    /// Waits for the write-behind issued so far; the blocks durable on disk.
    pub async fn sync(&self) -> Result<u64> {
        Ok(self
            .sync_report(v1::SyncRequest::default())
            .await?
            .durable_blocks)
    }

    /// [`Client::sync`] with its options and the full report: what is not
    /// durable, and (`retry_dropped`) dropped writes retried with
    /// back-pressure.
    pub async fn sync_report(&self, req: v1::SyncRequest) -> Result<v1::SyncResponse> {
        Ok(self.rpc().sync(req).await?.into_inner())
    }

    pub async fn stats(&self) -> Result<v1::StatsResponse> {
        Ok(self.rpc().stats(v1::StatsRequest {}).await?.into_inner())
    }
}
