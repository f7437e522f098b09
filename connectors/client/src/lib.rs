//! Rust client of the kvbm daemon.
//!
//! - [`Client`]: the `kvtier.v1.Kvbm` gRPC API over the daemon's Unix socket
//!   or TCP.
//! - [`Pool`]: the zero-copy path. A local client attaches the daemon's
//!   shared host pool through the pool socket (`<socket>.pool`), maps it, and
//!   moves block bytes with `Reserve`/`Commit` and `Acquire`/`Release`.
//! - [`Session`]: a session on the pool socket without the mapping, for the
//!   latency-critical Lookup (binary frames instead of gRPC).

mod pool;

pub use kvtier_proto::session::LookupCounts;
pub use kvtier_proto::v1;
pub use pool::{pool_socket_path, Pool, Session};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
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
    rpc: KvbmClient<Channel>,
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
        let channel = if unix_socket_path(addr).is_none() {
            Endpoint::from_shared(addr.to_string())
                .map_err(|_| Error::Address(addr.to_string()))?
                .tcp_nodelay(true)
                .connect()
                .await
                .map_err(|source| Error::Connect {
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
            rpc: KvbmClient::new(channel)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        })
    }

    /// The generated gRPC client, for any call of the API.
    pub fn rpc(&self) -> KvbmClient<Channel> {
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
    pub async fn sync(&self) -> Result<u64> {
        Ok(self
            .rpc()
            .sync(v1::SyncRequest {})
            .await?
            .into_inner()
            .durable_blocks)
    }

    pub async fn stats(&self) -> Result<v1::StatsResponse> {
        Ok(self.rpc().stats(v1::StatsRequest {}).await?.into_inner())
    }
}
